"""Synthetic whole-slide images and a pyramid writer (tiled TIFF, BigTIFF, OME-TIFF, SubIFD, SVS-like).

:func:`write_synthetic_slide` writes a pyramidal, tiled, compressed TIFF of a
procedural "tissue" scene: a few tissue regions (pink texture with nuclei) on
an empty background, and small circular motifs inside the tissue. Motifs are
*lesions* (concentric rings) or *decoys* (a uniform disk of the rings' mean
colour): at low resolution both are the same dark dot, only level 0 tells
them apart. A slide's label is 1 when it holds a lesion. Tiles that touch no
tissue are stored empty (byte count 0, read as zeros), so a 100,000 x 100,000
slide with little tissue costs a few MB of disk. Each level is rendered from
the scene at its own scale (not block-averaged from level 0), so no level is
ever held in memory.

:func:`write_pyramid` writes an in-memory image as such a pyramid (e.g. to
convert a strip-based TIFF that fits in memory).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from ._deps import require

LAYOUTS = ("tiff", "bigtiff", "ome", "subifds", "svs")
COMPRESSIONS = {"jpeg": "jpeg", "jpeg2000": "jpeg2000", "deflate": "zlib", "zlib": "zlib", "lzw": "lzw",
                "zstd": "zstd", "none": None}

TISSUE = np.array([222, 160, 196], np.float32)
NUCLEUS = np.array([110, 50, 140], np.float32)
RING_DARK = np.array([60, 20, 80], np.float32)
RING_LIGHT = np.array([200, 120, 190], np.float32)
NUCLEUS_SPACING = 24.0
NUCLEUS_RADIUS = 5.0


FACTORS = (2, 3, 4)
"""Downsampling factors of a written pyramid: the ones tifffile recognizes between levels (``pyramidize_series``),
so that :func:`atskern.io.open_slide` finds every level."""


def _pyramid_shapes(shape, tile, factor, min_side):
    """Level shapes and downsamples down to a longest side of at most ``min_side``; a level stops the pyramid
    before a side would reach 1 pixel (tifffile finds no factor between a 1-pixel side and the next)."""
    if isinstance(factor, bool) or not isinstance(factor, numbers.Integral) or factor not in FACTORS:
        raise ValueError(f"factor must be one of {FACTORS} (the level ratios TIFF readers recognize), got {factor!r}")
    shapes, downsamples = [tuple(shape)], [1]
    d = 1
    while max(shapes[-1]) > min_side:
        d *= factor
        nxt = (-(-shape[0] // d), -(-shape[1] // d))
        if min(nxt) < 2:
            break
        shapes.append(nxt)
        downsamples.append(d)
    return shapes, downsamples


def _write(path, shapes, channels, dtype, tile, tile_fn, *, layout, compression, quality, description=None,
           thumbnail=None):
    """Write levels ``shapes`` whose tiles come from ``tile_fn(level, row, col)`` (an array or None: empty)."""
    tifffile = require("tifffile")
    require("imagecodecs")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {tuple(COMPRESSIONS)}, got {compression!r}")
    codec = COMPRESSIONS[compression]
    if codec == "jpeg" and (np.dtype(dtype) != np.uint8 or channels not in (1, 3)):
        # tifffile would write 12-bit JPEG for uint16 (values over 4095 destroyed) or fail on the shape
        raise ValueError(f"compression='jpeg' holds uint8 images of 1 or 3 channels, got {np.dtype(dtype)} with "
                         f"{channels} channels; use a lossless one (zstd, deflate, lzw) or jpeg2000")
    args = dict(tile=(tile, tile), compression=codec, photometric="rgb" if channels == 3 else "minisblack",
                metadata=None)
    if channels > 1:  # samples interleaved in each pixel (else tifffile reads (H, W, C) as H planes of (W, C))
        args["planarconfig"] = "contig"
    if codec == "jpeg":
        args["compressionargs"] = {"level": quality}
    elif codec == "jpeg2000":
        args["compressionargs"] = {"level": quality}

    def tiles(level):
        h, w = shapes[level]
        first = True
        for r in range(-(-h // tile)):
            for c in range(-(-w // tile)):
                t = tile_fn(level, r, c)
                if t is None and first:  # tifffile infers the dtype from the first tile: store it
                    t = np.zeros((tile, tile, channels), dtype)
                first = False
                yield t

    def data_args(level):
        h, w = shapes[level]
        return dict(data=tiles(level), shape=(h, w, channels) if channels > 1 else (h, w), dtype=dtype)

    bigtiff = layout in ("bigtiff", "ome") or math.prod(shapes[0]) * channels > 2**31
    with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=(layout == "ome")) as writer:
        if layout in ("ome", "subifds"):
            first = dict(args)
            if layout == "ome":
                first.pop("metadata")
                first["metadata"] = {"axes": "YXS" if channels > 1 else "YX"}
            writer.write(**data_args(0), subifds=len(shapes) - 1, **first)
            for level in range(1, len(shapes)):
                writer.write(**data_args(level), subfiletype=1, **args)
        else:
            writer.write(**data_args(0), description=description, **args)
            if layout == "svs":
                thumb = thumbnail if thumbnail is not None else np.zeros((16, 16, channels), dtype)
                writer.write(thumb, photometric=args["photometric"], planarconfig=args.get("planarconfig"),
                             metadata=None, description=description)
            for level in range(1, len(shapes)):
                writer.write(**data_args(level), subfiletype=1 if layout != "svs" else 0, **args)
    return path


def _svs_description(shape, tile, compression, mpp=0.5):
    h, w = shape
    return (f"Aperio Image Library v12.0.15 atskern synthetic\r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) "
            f"{compression.upper()}/RGB Q=80|AppMag = 20|MPP = {mpp}|Filename = synthetic")


def write_pyramid(path, image, *, tile=256, factor=2, min_side=None, layout="tiff", compression="jpeg", quality=90,
                  sparse=False):
    """Write ``image`` ``(H, W)`` or ``(H, W, C)`` as a tiled pyramid TIFF; returns ``path``.

    Levels are ``factor`` x ``factor`` block means (2, 3 or 4: the ratios
    TIFF readers recognize) down to a side of at most ``min_side`` (default:
    one tile), stopping before a side would reach 1 pixel. ``layout``:
    ``"tiff"`` (reduced pages), ``"bigtiff"``, ``"ome"`` (OME-TIFF, levels in
    SubIFDs), ``"subifds"`` (plain TIFF, levels in SubIFDs) or ``"svs"``
    (Aperio-like: description, a stripped thumbnail as page 1).
    ``compression``: jpeg (uint8, 1 or 3 channels), jpeg2000, deflate, lzw,
    zstd, none. ``sparse=True`` stores all-zero tiles empty.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
    if min_side is not None and (isinstance(min_side, (bool, np.bool_)) or not isinstance(min_side, numbers.Integral)
                                 or min_side < 1):
        raise ValueError(f"min_side must be an int >= 1 (the longest side of the smallest level) or None (one "
                         f"tile), got {min_side!r}")
    shapes, downsamples = _pyramid_shapes(image.shape[:2], tile, factor, tile if min_side is None else min_side)
    levels = [image]
    for _ in shapes[1:]:
        prev = levels[-1].astype(np.complex128 if image.dtype.kind == "c" else np.float64)  # complex: keep imag
        h, w = -(-prev.shape[0] // factor), -(-prev.shape[1] // factor)
        padded = np.pad(prev, ((0, h * factor - prev.shape[0]), (0, w * factor - prev.shape[1]), (0, 0)), mode="edge")
        mean = padded.reshape(h, factor, w, factor, -1).mean(axis=(1, 3))
        levels.append(np.rint(mean).astype(image.dtype) if image.dtype.kind in "iu" else mean.astype(image.dtype))

    def tile_fn(level, r, c):
        t = levels[level][r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
        if sparse and not t.any():
            return None
        return t if image.shape[2] > 1 else t[..., 0]

    description = _svs_description(image.shape[:2], tile, compression) if layout == "svs" else None
    return _write(path, shapes, image.shape[2], image.dtype, tile, tile_fn, layout=layout, compression=compression,
                  quality=quality, description=description, thumbnail=levels[-1])


@dataclass
class Scene:
    """A procedural slide: tissue ellipses and motifs, in level-0 pixels."""

    shape: tuple
    tissue: list = field(default_factory=list)   # (cy, cx, ry, rx)
    motifs: list = field(default_factory=list)   # (cy, cx, radius, kind): kind "lesion" or "decoy"
    seed: int = 0

    @property
    def label(self) -> int:
        return int(any(kind == "lesion" for *_, kind in self.motifs))


def make_scene(size, *, label, seed=0, tissue_regions=3, tissue_scale=0.18, lesions=(1, 3), decoys=(1, 4),
               motif_radius=40):
    """A random :class:`Scene` of ``size`` (int or (H, W)) with the given ``label`` (1: holds lesions)."""
    rng = np.random.default_rng(seed)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    scene = Scene((h, w), seed=int(seed))
    for _ in range(tissue_regions):
        ry, rx = rng.uniform(0.5, 1.0, 2) * tissue_scale * np.array([h, w])
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        scene.tissue.append((cy, cx, max(ry, 2 * motif_radius), max(rx, 2 * motif_radius)))
    counts = {"lesion": int(rng.integers(lesions[0], lesions[1] + 1)) if label else 0,
              "decoy": int(rng.integers(decoys[0], decoys[1] + 1))}
    for kind, count in counts.items():
        for _ in range(count):
            cy, cx, ry, rx = scene.tissue[int(rng.integers(len(scene.tissue)))]
            t, rho = rng.uniform(0, 2 * np.pi), 0.7 * np.sqrt(rng.uniform())
            scene.motifs.append((cy + rho * ry * np.sin(t), cx + rho * rx * np.cos(t), float(motif_radius), kind))
    return scene


def _hash(a, b, seed):
    x = (a.astype(np.uint64) * np.uint64(0x9E3779B1) ^ b.astype(np.uint64) * np.uint64(0x85EBCA77)
         ^ np.uint64(seed & 0xFFFFFFFF) * np.uint64(0xC2B2AE3D))
    x ^= x >> np.uint64(15)
    x *= np.uint64(0x2C1B3C6D)
    x ^= x >> np.uint64(12)
    return (x & np.uint64(0xFFFF)).astype(np.float32) / 65535.0


def render(scene, downsample, y0, x0, h, w):
    """Pixels ``(h, w, 3)`` uint8 of ``scene`` at ``downsample``, from (y0, x0) of that level; None if no tissue."""
    d = float(downsample)
    top, left, bottom, right = y0 * d, x0 * d, (y0 + h) * d, (x0 + w) * d
    near = [e for e in scene.tissue
            if e[0] + e[2] > top and e[0] - e[2] < bottom and e[1] + e[3] > left and e[1] - e[3] < right]
    if not near:
        return None
    Y = ((np.arange(y0, y0 + h, dtype=np.float32) + 0.5) * d)[:, None]
    X = ((np.arange(x0, x0 + w, dtype=np.float32) + 0.5) * d)[None, :]
    inside = np.zeros((h, w), bool)
    for cy, cx, ry, rx in near:
        wobble = 1.0 + 0.06 * np.sin(3.0 * np.arctan2(Y - cy, X - cx) + cy)
        inside |= ((Y - cy) / ry) ** 2 + ((X - cx) / rx) ** 2 < wobble
    if not inside.any():
        return None
    rng = np.random.default_rng([scene.seed, int(d), y0, x0])
    image = np.broadcast_to(TISSUE, (h, w, 3)).copy()
    image += rng.normal(0.0, 10.0 / math.sqrt(d), (h, w, 1)).astype(np.float32)
    # nuclei: one per NUCLEUS_SPACING cell, jittered; below 1/4 resolution only their mean darkening
    area = math.pi * NUCLEUS_RADIUS ** 2 / NUCLEUS_SPACING ** 2
    if d <= 4:
        ci, cj = np.floor(Y / NUCLEUS_SPACING), np.floor(X / NUCLEUS_SPACING)
        ny = (ci + 0.2 + 0.6 * _hash(ci + 0 * cj, cj, scene.seed)) * NUCLEUS_SPACING
        nx = (cj + 0.2 + 0.6 * _hash(cj + 0 * ci, ci, scene.seed + 1)) * NUCLEUS_SPACING
        dist = np.sqrt((Y - ny) ** 2 + (X - nx) ** 2)
        weight = np.clip((NUCLEUS_RADIUS - dist) / d + 0.5, 0.0, 1.0)
    else:
        weight = np.full((h, w), area, np.float32)
    image += weight[..., None] * (NUCLEUS - image)
    for cy, cx, radius, kind in scene.motifs:
        if cy + radius < top or cy - radius > bottom or cx + radius < left or cx - radius > right:
            continue
        dist = np.sqrt((Y - cy) ** 2 + (X - cx) ** 2)
        cover = np.clip((radius - dist) / d + 0.5, 0.0, 1.0)
        if kind == "lesion":  # rings of period 16 px, faded out where the level cannot resolve them
            contrast = max(0.0, 1.0 - d / 6.0)
            v = 0.5 + 0.5 * contrast * np.cos(2 * np.pi * dist / 16.0)
        else:
            v = np.full_like(dist, 0.5)
        colour = RING_DARK + v[..., None] * (RING_LIGHT - RING_DARK)
        image += cover[..., None] * (colour - image)
    image *= inside[..., None]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def write_synthetic_slide(path, size=8192, *, label=1, seed=0, tile=256, factor=4, min_side=512, layout="tiff",
                          compression="jpeg", quality=80, progress=False, **scene_args):
    """Write a synthetic pyramidal slide (see the module doc); returns its :class:`Scene`.

    ``size``: level 0 side (int) or (H, W), up to 100,000 and beyond; levels
    shrink by ``factor`` down to at most ``min_side``. ``label`` 1 puts
    lesions in the tissue, 0 only decoys. ``scene_args`` go to
    :func:`make_scene` (``tissue_regions``, ``tissue_scale``, ``lesions``,
    ``decoys``, ``motif_radius``). ``progress=True`` shows a tqdm bar.
    """
    scene = make_scene(size, label=label, seed=seed, **scene_args)
    shapes, downsamples = _pyramid_shapes(scene.shape, tile, factor, min_side)
    bar = None
    if progress:
        tqdm = require("tqdm").tqdm
        total = sum(-(-h // tile) * -(-w // tile) for h, w in shapes)
        bar = tqdm(total=total, desc=f"slide {path}", unit="tile", leave=False)

    def tile_fn(level, r, c):
        if bar is not None:
            bar.update()
        h, w = shapes[level]
        rows, cols = min(tile, h - r * tile), min(tile, w - c * tile)
        return render(scene, downsamples[level], r * tile, c * tile, rows, cols)

    thumb = render(scene, downsamples[-1], 0, 0, *shapes[-1])
    description = _svs_description(scene.shape, tile, compression) if layout == "svs" else None
    try:
        _write(path, shapes, 3, np.uint8, tile, tile_fn, layout=layout, compression=compression, quality=quality,
               description=description, thumbnail=thumb if thumb is not None else np.zeros((*shapes[-1], 3), np.uint8))
    finally:
        if bar is not None:
            bar.close()
    return scene
