"""The ATS-versus-dense plot: time and peak memory per sample against megapixels, log-log."""

from __future__ import annotations

from pathlib import Path


def plot_ats_dense(raw: dict, path: Path) -> Path:
    """Write a two-panel PNG from ``bench.ats_dense`` raw results (``"method/size/batch" -> figures``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for key, figures in raw.items():
        method, size, batch = key.split("/")
        for name, values in (figures or {}).items():
            if not isinstance(values, dict):
                continue
            label = ("dense" if name == "dense" else f"ATS n={name[3:]}") + f", B={batch}"
            series.setdefault(label, []).append((int(size) ** 2 / 1e6, values["train_s"] * 1e3, values["train_bytes"] / 2**20))
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, points in sorted(series.items()):
        points.sort()
        mp, ms, mib = zip(*points)
        style = "--" if label.startswith("dense") else "-"
        ax_time.plot(mp, ms, style, marker="o", label=label)
        ax_mem.plot(mp, mib, style, marker="o", label=label)
    for ax, ylabel in ((ax_time, "training step, ms per sample"), (ax_mem, "peak memory, MiB per sample")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("image size, megapixels")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8)
    fig.suptitle("ATS versus dense processing (one training step)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
