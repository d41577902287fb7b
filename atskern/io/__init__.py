"""Lazy readers of tiled whole-slide pyramids: ATS patches read from disk on demand.

``open_slide(path)`` returns a :class:`Slide` whose ``levels`` are lazy,
read-only arrays; ``slide.read_patches(offsets, patch_size, level)`` reads and
decodes only the tiles under the patches (in a thread pool, with an LRU tile
cache), and ``slide.read_multiscale(samples, grid_shape, patch_sizes, levels)``
maps attention-grid samples into any level with :func:`atskern.patch_offsets`.

Needs the optional ``tifffile`` and ``imagecodecs`` packages
(``pip install 'atskern[slides]'``); OpenSlide is an optional second backend
(``pip install 'atskern[openslide]'``). Importing this module needs neither.
"""

from ._cache import TileCache
from ._tiff import SlideFormatError
from .slide import Slide, SlideLevel, open_slide
from .synthetic import write_pyramid, write_synthetic_slide

__all__ = ["open_slide", "Slide", "SlideLevel", "TileCache", "SlideFormatError", "write_pyramid",
           "write_synthetic_slide"]
