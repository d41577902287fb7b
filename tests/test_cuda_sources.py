"""Every CUDA source compiles with nvcc (PTX for sm_90), so a kernel syntax error never lands."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from atskern.gpu._module import SOURCE_DIR, source

SOURCES = sorted(p.name for p in SOURCE_DIR.glob("*.cu"))


def test_there_are_cuda_sources():
    assert SOURCES, f"no .cu files found in {SOURCE_DIR}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("name", SOURCES)
def test_cuda_source_compiles(name, tmp_path):
    inlined = tmp_path / name
    inlined.write_text(source(name))
    result = subprocess.run(
        ["nvcc", "--ptx", "-arch=sm_90", "--std=c++17", "-Werror", "all-warnings", str(inlined), "-o", str(tmp_path / "out.ptx")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_scatter_keeps_subnormals_under_cupys_ftz(tmp_path):
    """CuPy compiles every kernel with -ftz=true; the deterministic scatter's float32 sums must still keep
    subnormals (inline add.rn.f32), or they would differ from the CPU kernel's."""
    inlined = tmp_path / "patches.cu"
    inlined.write_text(source("patches.cu"))
    ptx = tmp_path / "patches.ptx"
    result = subprocess.run(["nvcc", "--ptx", "-arch=sm_90", "--std=c++17", "-ftz=true", str(inlined), "-o", str(ptx)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = ptx.read_text()
    start = text.index(".entry scatter_f32_i32")
    body = text[start:text.index(".entry", start + 10)]
    assert "add.rn.f32" in body
    assert ".ftz.f32" not in body


def _ptxas_report(text: str) -> list[tuple[str, str, int, int]]:
    """``(entry kernel, function, spill store bytes, spill load bytes)`` of every function of a ``ptxas -v``
    report."""
    report, entry, function = [], None, None
    for line in text.splitlines():
        if "Compiling entry function" in line:
            entry = line.split("'")[1]
        elif "Function properties for" in line:
            function = line.split("Function properties for")[1].strip()
        elif "bytes spill stores" in line and function is not None:
            numbers = [int(word) for word in line.replace(",", " ").split() if word.isdigit()]
            report.append((entry, function, numbers[1], numbers[2]))  # stack frame, spill stores, spill loads
            function = None
    return report


def test_streaming_loops_keep_everything_in_registers(sampling_ptx, sampling_ptxas):
    """The per-position loops of the statistics and screening passes (``stats_range`` and ``screen_range``, every
    dtype, plain weights and logits/rescaled ones) spill nothing under chunk_stats', chunk_topn's and
    sample_rows' register caps, with the default compile options (ptxas -v, sm_90), and touch no local memory
    (PTX): inlined into their kernels, beside exp and the selection, they had spilled 80-130 bytes."""
    ptx = sampling_ptx
    report = _ptxas_report(sampling_ptxas)
    loops = [(entry, function, stores, loads) for entry, function, stores, loads in report
             if "stats_range" in function or "screen_range" in function]
    # 2 dtypes x (plain, general) x (stats in chunk_stats, screen in chunk_topn, both in sample_rows, the
    # statistics with sample_rows' deeper unrolling)
    assert len(loops) == 16, report
    assert all(stores == 0 and loads == 0 for _, _, stores, loads in loops), loops
    # and float32's selecting loop, the n = 2048 path (select_range in chunk_topn_f32)
    selecting = [(stores, loads) for entry, function, stores, loads in report
                 if entry == "chunk_topn_f32" and "select_rangeIf" in function]
    assert selecting == [(0, 0)], report
    # nor do they touch local memory otherwise (ptxas does not count a caller's variable reached through a
    # reference as a spill: sums accumulated that way had put 96 st.local in the statistics loop)
    bodies = re.findall(r"\.func[^\n]*?(_Z\d+(?:stats_range|screen_range)\w*)\((.*?)\n}\n", ptx.read_text(), re.S)
    assert len(bodies) == 12, [name for name, _ in bodies]  # 8 above, and sample_rows' 4 statistics loops
    assert all("ld.local" not in body and "st.local" not in body for _, body in bodies), \
        [name for name, body in bodies if "ld.local" in body or "st.local" in body]


def test_sample_rows_reads_its_own_writes_coherently(sampling_ptx):
    """sample_rows reads back the screened keys and positions its threads wrote in the same launch: with plain
    loads (coherent for the block after its barrier), never ld.global.nc, the read-only path, which is not;
    sample_cluster_rows' block 0 reads what the cluster's other blocks wrote with ld.global.cg (past its L1) after
    the cluster's barriers (release, acquire)."""
    text = sampling_ptx.read_text()
    for kernel in ("sample_rows_f32", "sample_rows_f64", "sample_cluster_rows_f32", "sample_cluster_rows_f64"):
        start = text.index(f".entry {kernel}(")
        end = text.find(".entry", start + 10)
        body = text[start:end if end > 0 else len(text)]
        assert "ld.global" in body and "ld.global.nc" not in body, kernel
        if "cluster" in kernel:  # the cluster's barriers, and block 0 reads the others' keys past its L1
            assert body.count("barrier.cluster.arrive.release") == body.count("barrier.cluster.wait.acquire") >= 3
            assert "ld.global.cg" in body


def test_selecting_kernels_fit_the_default_shared_memory(sampling_ptxas):
    """The selection buffer (n up to 2048 plus a tile of offers) and the radix sort's storage that overlays it fit
    the 48 KiB of static shared memory a block gets without opting in, at the largest block size; ptxas says so
    per kernel."""
    from atskern.gpu import sampling as gs

    threads = max(gs.SELECT_THREADS)
    assert threads == 256, "the shared PTX is built for 256-thread blocks"
    kernels = ("chunk_topn_f32", "chunk_topn_f64", "finish_rows_f32", "finish_rows_f64", "sample_rows_f32",
               "sample_rows_f64")
    smem = {}
    name = None
    for line in sampling_ptxas.splitlines():
        if "Compiling entry function" in line:
            name = line.split("'")[1]
        found = re.search(r"(\d+) bytes smem", line)
        if found and name:
            smem[name] = int(found.group(1))
    for kernel in kernels:
        assert gs.selection_capacity(threads) * 12 <= smem[kernel] <= 48 * 1024, (kernel, smem)
