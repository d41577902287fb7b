"""Patches from gigapixel slides: atskern.io against OpenSlide, tiffslide and a naive tifffile loop; ATS on 50,000².

Random 256x256 patches at level 0 of one synthetic, tiled JPEG slide
(50,000 x 50,000, tissue-like regions; patches drawn inside the tissue), read
in batches of 10 (one ATS step's patches of one slide) by

- ``atskern.io``: ``Slide.read_patches`` (only the tiles under the patches,
  decoded in a thread pool, LRU tile cache of 128 MiB, its default);
- ``atskern.io, no tile cache``: the same with ``cache_bytes=0`` (every pass
  decodes again: the warm pass then measures decoding from the OS page cache);
- ``openslide``: ``OpenSlide.read_region`` per patch (its own tile cache at
  its default, 32 MiB), RGBA to RGB;
- ``tiffslide``: ``TiffSlide.read_region(..., as_array=True)`` per patch;
- ``tifffile loop``: per patch, read and decode every tile under it with
  tifffile (no cache), then crop,

with 1 and 2 threads (threads running the per-patch loops, or atskern's
decode pool). Each (method, threads) runs in a fresh process: the file's
pages are first dropped from the OS cache with ``posix_fadvise(DONTNEED)``
(cold pass), then the same patches are read again (warm pass). Peak RSS is
the process's maximum resident set (``VmHWM``) minus its size once the
reader is open. A second table times an ATS training step (torch, patches read from
the slide inside the step) and compares its peak memory with what dense
processing of level 0 would need (computed; it cannot run).

    python -m bench --only slides          (or python -m bench.slides [--quick])
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ._timing import Table

NAME = "slides"
SIDE = 50_000
QUICK_SIDE = 12_000
PATCH = 256
BATCH = 10
METHODS = ["atskern.io", "atskern.io, no tile cache", "openslide", "tiffslide", "tifffile loop"]
THREADS = [1, 2]
REPEATS = 3  # fresh processes per row; the table shows medians (the machine is shared)
DATA = Path(os.environ.get("ATSKERN_BENCH_DATA", Path.home() / ".cache" / "atskern-bench"))
ROOT = Path(__file__).resolve().parents[1]


def cases(quick: bool):
    return [(m, t) for m in METHODS for t in THREADS] + [("ats-step", 2)]


def bench_slide(side: int) -> Path:
    """The benchmark slide (written once, then reused): ~8% tissue, JPEG tiles of 256, levels /4."""
    from atskern.io.synthetic import write_synthetic_slide

    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / f"slide-{side}-v1.tif"
    if not path.exists():
        tmp = path.with_suffix(".tmp.tif")
        write_synthetic_slide(tmp, side, label=1, seed=7, tile=256, factor=4, min_side=1024, tissue_regions=3,
                              tissue_scale=0.12, lesions=(3, 3), decoys=(3, 3), quality=80, progress=True)
        tmp.rename(path)
    return path


def patch_positions(side: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` patch offsets inside the slide's tissue (rejection sampling against the scene)."""
    from atskern.io.synthetic import make_scene

    scene = make_scene(side, label=1, seed=7, tissue_regions=3, tissue_scale=0.12, lesions=(3, 3), decoys=(3, 3))
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        cy, cx, ry, rx = scene.tissue[int(rng.integers(len(scene.tissue)))]
        t, rho = rng.uniform(0, 2 * np.pi), 0.9 * np.sqrt(rng.uniform())
        y, x = int(cy + rho * ry * np.sin(t)) - PATCH // 2, int(cx + rho * rx * np.cos(t)) - PATCH // 2
        if 0 <= y <= side - PATCH and 0 <= x <= side - PATCH:
            out.append((y, x))
    return np.array(out, np.int64)


def _drop_cache(path) -> str:
    if not hasattr(os, "posix_fadvise"):
        return "posix_fadvise unavailable: not dropped"
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return "dropped (posix_fadvise DONTNEED)"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM): unlike ru_maxrss it is not inherited across fork + exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reader(method: str, path: str, threads: int):
    """A function reading a batch of offsets ``(K, 2)`` into ``(K, 256, 256, 3)`` uint8, and a closer."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def loop(one):
        def read(offsets):
            if pool is None:
                return np.stack([one(y, x) for y, x in offsets])
            return np.stack(list(pool.map(lambda yx: one(*yx), offsets)))
        return read

    if method.startswith("atskern.io"):
        from atskern.io import open_slide

        slide = open_slide(path, threads=threads, **({"cache_bytes": 0} if "no tile cache" in method else {}))
        return (lambda offsets: slide.read_patches(offsets, PATCH)), slide.close
    if method == "openslide":
        import openslide

        handle = openslide.OpenSlide(path)
        return loop(lambda y, x: np.asarray(handle.read_region((int(x), int(y)), 0, (PATCH, PATCH)))[..., :3]), handle.close
    if method == "tiffslide":
        import tiffslide

        handle = tiffslide.TiffSlide(path)
        return loop(lambda y, x: handle.read_region((int(x), int(y)), 0, (PATCH, PATCH), as_array=True)[..., :3]), \
            handle.close
    if method == "tifffile loop":
        import threading

        import tifffile

        local = threading.local()

        def page():
            if not hasattr(local, "tif"):  # a TiffFile per thread: its file handle has one position
                local.tif = tifffile.TiffFile(path)
                local.page = local.tif.series[0].levels[0].keyframe
            return local.tif, local.page

        def one(y, x):
            tif, pg = page()
            th, tw = pg.tilelength, pg.tilewidth
            across = -(-pg.imagewidth // tw)
            rows = range(y // th, (y + PATCH - 1) // th + 1)
            cols = range(x // tw, (x + PATCH - 1) // tw + 1)
            block = np.zeros((len(rows) * th, len(cols) * tw, 3), np.uint8)
            for i, r in enumerate(rows):
                for j, c in enumerate(cols):
                    index = r * across + c
                    count = pg.databytecounts[index]
                    if count:
                        tif.filehandle.seek(pg.dataoffsets[index])
                        data = tif.filehandle.read(count)
                        tile = pg.decode(data, index, jpegtables=pg.jpegtables)[0]
                        block[i * th:(i + 1) * th, j * tw:(j + 1) * tw] = tile.reshape(th, tw, 3)
            y0, x0 = rows[0] * th, cols[0] * tw
            return block[y - y0:y - y0 + PATCH, x - x0:x - x0 + PATCH]

        return loop(one), lambda: None
    raise ValueError(method)


def worker_read(method: str, threads: int, side: int, count: int) -> dict:
    path = str(bench_slide(side))
    offsets = patch_positions(side, count)
    dropped = _drop_cache(path)
    read, close = _reader(method, path, threads)
    base = _rss_bytes()
    result = {"dropped": dropped}
    check = None
    for name in ("cold", "warm"):
        start = time.perf_counter()
        for i in range(0, count, BATCH):
            patches = read(offsets[i:i + BATCH])
            if check is None:
                check = patches
        result[f"{name}_pps"] = count / (time.perf_counter() - start)
    result["peak_rss_mib"] = (_peak_rss_bytes() - base) / 2**20
    from atskern.io import open_slide

    reference = open_slide(path, threads=1).read_patches(offsets[:BATCH], PATCH)
    result["equal_to_atskern"] = bool(np.array_equal(check, reference))
    close()
    return result


def worker_ats(side: int, steps: int) -> dict:
    """Time ATS training steps on one slide (patches read inside the step) and record the process's peak RSS."""
    import torch
    from torch import nn

    from ats.torch.slides import SlideAttentionSampling, SlideDataset, collate_slides

    torch.set_num_threads(2)
    path = str(bench_slide(side))
    torch.manual_seed(0)
    attention = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))
    feature = nn.Sequential(nn.Conv2d(3, 32, 7, stride=2), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2), nn.ReLU(),
                            nn.Conv2d(32, 32, 3, stride=2), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                            nn.Linear(32, 2))
    model = SlideAttentionSampling(attention, feature, patch_size=PATCH, n_patches=BATCH, threads=2)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    data = SlideDataset([path], [1], low_side=1024)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        batch = collate_slides([data[0]])  # the low view read from the pyramid each step (as a loader would)
        logits, _, _ = model(batch.x_low, batch.slides, batch.sizes)
        loss = nn.functional.cross_entropy(logits, batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    low = tuple(batch.x_low.shape[2:])
    return {"step_s": float(np.median(times[1:] if len(times) > 1 else times)), "first_step_s": times[0],
            "peak_rss_mib": _peak_rss_bytes() / 2**20, "low": low}


def _run_worker(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "adapters")]))
    out = subprocess.run([sys.executable, "-m", "bench.slides", "--worker", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def dense_needs(side: int) -> dict:
    """Bytes a dense pass over level 0 would need: the uint8 image, its float32 copy, one 32-channel stride-2 map."""
    pixels = side * side
    return {"uint8": pixels * 3, "float32": pixels * 3 * 4, "first conv (32 ch, /2, f32)": pixels // 4 * 32 * 4}


def run(quick: bool = False, progress=None) -> tuple:
    side = QUICK_SIDE if quick else SIDE
    count = 60 if quick else 120
    bench_slide(side)  # written once, outside the timed workers
    reads = Table(NAME, f"Random {PATCH}² patches at level 0 of a {side:,}² JPEG-tiled slide, batches of {BATCH} "
                        f"(patches per second; median of {1 if quick else REPEATS} fresh processes per row)",
                  ["method", "threads", "cold patches/s", "warm patches/s", "cold x openslide", "warm x openslide",
                   "peak RSS MiB", "pixels = atskern"])
    results = {}
    repeats = 1 if quick else REPEATS
    for method, threads in cases(quick):
        if method == "ats-step":
            continue
        runs = [_run_worker(["read", method, str(threads), str(side), str(count)]) for _ in range(repeats)]
        good = [r for r in runs if "error" not in r]
        if good:
            merged = dict(good[0])
            for key in ("cold_pps", "warm_pps", "peak_rss_mib"):
                merged[key] = float(np.median([r[key] for r in good]))
            merged["equal_to_atskern"] = all(r["equal_to_atskern"] for r in good)
            merged["runs"] = runs
            results[(method, threads)] = merged
        else:
            results[(method, threads)] = runs[0]
        if progress is not None:
            progress.update(1)
    dropped = "?"
    for (method, threads), r in results.items():
        if "error" in r:
            reads.rows.append([method, threads, "error", r["error"][:60], "", "", "", ""])
            continue
        dropped = r["dropped"]
        base = results.get(("openslide", threads), {})
        reads.rows.append([method, threads, r["cold_pps"], r["warm_pps"],
                           r["cold_pps"] / base["cold_pps"] if "cold_pps" in base else "n/a",
                           r["warm_pps"] / base["warm_pps"] if "warm_pps" in base else "n/a",
                           r["peak_rss_mib"], "yes" if r["equal_to_atskern"] else "NO"])
    reads.notes.append(f"{count} patches inside the tissue, read twice: cold = first pass after the file's pages were "
                       f"{dropped}; warm = the same patches again in the same process")
    offsets = patch_positions(side, count)
    tiles = {(int(y) // 256 + dy, int(x) // 256 + dx) for y, x in offsets for dy in (0, 1) for dx in (0, 1)
             if (int(y) % 256 or not dy) and (int(x) % 256 or not dx)}
    reads.notes.append(f"cache budgets at their defaults: atskern.io 128 MiB of decoded tiles, OpenSlide 32 MiB; "
                       f"the {count} patches touch {len(tiles)} tiles = {len(tiles) * 256 * 256 * 3 / 2**20:.0f} MiB "
                       f"decoded (a pass larger than the budget would evict every tile before its reuse: "
                       f"the 'no tile cache' rows show the decode-bound rate)")
    reads.raw = {f"{m}/{t}": r for (m, t), r in results.items()}

    ats = _run_worker(["ats", str(side), "3" if quick else "5"])
    if progress is not None:
        progress.update(1)
    step = Table(NAME + "-ats", f"ATS training step on one {side:,}² slide (torch, 10 patches of {PATCH}², "
                                f"read from the slide inside the step) versus dense processing (computed)",
                 ["method", "s / step", "peak RSS MiB (whole process)", "note"])
    if "error" in ats:
        step.rows.append(["ATS", "error", "", ats["error"][:80]])
    else:
        step.rows.append(["ATS", ats["step_s"], ats["peak_rss_mib"],
                          f"low view {ats['low'][0]}x{ats['low'][1]} from the pyramid, attention grid half that; first step "
                          f"{ats['first_step_s']:.2f} s (cold)"])
    for what, nbytes in dense_needs(side).items():
        step.rows.append([f"dense: level 0 {what}", "cannot run", nbytes / 2**20, "computed"])
    step.raw = {"ats": ats, "dense": dense_needs(side)}
    return reads, step


def _main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.slides")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs="+")
    args = parser.parse_args(argv)
    if args.worker:
        kind, *rest = args.worker
        if kind == "read":
            method, threads, side, count = rest
            result = worker_read(method, int(threads), int(side), int(count))
        else:
            side, steps = rest
            result = worker_ats(int(side), int(steps))
        print(json.dumps(result))
        return 0
    for table in run(args.quick):
        print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(_main())
