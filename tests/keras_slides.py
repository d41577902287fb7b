"""The three synthetic slides of the ``ats.slides`` (Keras) tests, shared by the TensorFlow and the torch/JAX files."""

from __future__ import annotations

SIZES = [(640, 640), (512, 896), (960, 704)]


def write_slides(root) -> list[str]:
    """Write the slides ``k0.tif``, ``k1.tif``, ``k2.tif`` (labels 0, 1, 0) under ``root``; return their paths."""
    from atskern import io as aio

    paths = []
    for i, size in enumerate(SIZES):
        path = root / f"k{i}.tif"
        aio.write_synthetic_slide(path, size, label=i % 2, seed=10 + i, tile=128, factor=4, min_side=256,
                                  tissue_scale=0.3, motif_radius=24)
        paths.append(str(path))
    return paths
