"""Timing and machine helpers shared by the benchmarks."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import numpy as np


def median_seconds(fn, *, repeats: int = 7, warmup: int = 1, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    With ``min_time``, runs repeat until their total passes it (at least ``repeats``).
    """
    for _ in range(warmup):
        fn()
    times = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while len(times) < repeats or sum(times) < min_time:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            if len(times) >= 10 * repeats:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(times)


def memcpy_bandwidth(nbytes: int = 256 << 20, repeats: int = 7) -> float:
    """Bytes per second of ``np.copyto`` between two large arrays (read + write of ``nbytes``)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    seconds = median_seconds(lambda: np.copyto(dst, src), repeats=repeats)
    return nbytes / seconds


@dataclass
class Table:
    """A result table: printed as markdown, stored in JSON."""

    name: str
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)
    skipped: str | None = None
    """Why the benchmark did not run here (no rows then)."""

    def markdown(self) -> str:
        if self.skipped:
            return f"### {self.title}\n\n- skipped: {self.skipped}\n"

        def cell(value):
            if isinstance(value, float):
                if value == float("inf"):
                    return "inf"
                return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
            return str(value)

        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows,
            "notes": self.notes,
            "raw": self.raw,
            "skipped": self.skipped,
        }


def machine_description(tensorflow: bool = True) -> dict:
    """The machine and library versions for a report's header (TensorFlow's only with ``tensorflow``: importing
    it takes seconds, wasted where only GPU tables run)."""
    import numba

    info = {
        "machine": platform.node(),
        "processor": _cpu_model(),
        "cores": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if tensorflow:
        try:
            import tensorflow as tf

            info["tensorflow"] = tf.__version__
        except ImportError:
            pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def quiet_tensorflow():
    """Import TensorFlow with its start-up logging silenced."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    return tf


def has_module(name: str) -> bool:
    """Whether ``name`` can be imported (False also where it is blocked with ``sys.modules[name] = None``)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


TENSORFLOW_MISSING = "TensorFlow is not installed: its columns are skipped (n/a)"


def tensorflow_or_none():
    """TensorFlow (quiet), or None where it is not installed: its benchmark columns are then skipped."""
    try:
        return quiet_tensorflow()
    except ImportError:
        return None


def skipped(value):
    """A table cell: ``value``, or ``'n/a'`` for a method that did not run (None)."""
    return "n/a" if value is None else value
