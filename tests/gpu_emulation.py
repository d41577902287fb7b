"""NumPy emulations of the CUDA patch kernels (``atskern/gpu/patches.cu``), step for step, for CPU-only CI.

They run the kernels' algorithms with the launch plans of ``atskern.gpu.patches``
(the same scalar arguments a launch gets) so that the index arithmetic, the
16-byte chunking with funnel shifts, the tile decomposition and the order of
the scatter's sums are checked on machines without a GPU. The GPU tests then
check the CUDA code itself against the same references.
"""

from __future__ import annotations

import numpy as np

from atskern.gpu import patches as gp

_INT_DTYPES = {code: np.dtype(f"{kind}{size}") for (kind, size), code in gp.OFFSET_KINDS.items()}


def _load_offset(offsets, stride_b, stride_k, stride_d, kind, b, k, d) -> int:
    """``load_offset``: the raw value at the byte strides, uint64 saturated to int64's maximum."""
    assert offsets.strides == (stride_b, stride_k, stride_d) and offsets.dtype == _INT_DTYPES[kind]
    return min(int(offsets[b, k, d]), 2**63 - 1)  # base + b * stride_b + k * stride_k + d * stride_d


def patch_box(offset_args, g: gp.Geometry, b: int, k: int) -> tuple[int, int, int]:
    """``patch_box``: a patch's canonical first element, clipped to ``[-P, S]``, last dim scaled."""
    offsets, sb, sk, sd, kind = offset_args
    o = [0, 0, 0]
    for c in range(3):
        d = c - (3 - g.dims)
        if d >= 0:
            o[c] = _load_offset(offsets, int(sb), int(sk), int(sd), int(kind), b, k, d)
    clip = lambda v, lo, hi: lo if v < lo else (hi if v > hi else v)  # noqa: E731
    return clip(o[0], -g.p0, g.s0), clip(o[1], -g.p1, g.s1), clip(o[2], -g.p2, g.s2) * g.scale


class ByteMemory:
    """A byte buffer placed at a chosen device address; reads check that each aligned 16-byte load holds a byte
    of the valid run it serves and lies inside the buffer (no load can leave the image's allocation)."""

    def __init__(self, data: bytes, address: int):
        self.data, self.address = bytearray(data), address

    def load16_inside(self, address: int) -> bool:
        """``load16_inside``: both aligned blocks of ``load16(address)`` lie in the buffer."""
        first = address & ~15
        return first >= self.address and first + (32 if address & 15 else 16) <= self.address + len(self.data)

    def load16(self, address: int, valid: tuple[int, int]) -> bytes:
        """``load16``: the 16 bytes at ``address`` from one or two aligned 16-byte blocks."""
        shift = address & 15
        blocks = [address - shift] + ([address - shift + 16] if shift else [])
        out = b""
        for block in blocks:
            assert block + 16 > valid[0] and block < valid[1], "an aligned load holds no byte of the run"
            assert self.address <= block and block + 16 <= self.address + len(self.data), "a load leaves the image"
            lo, hi = block - self.address, block + 16 - self.address
            chunk = bytes(self.data[max(lo, 0):max(hi, 0)])
            out += b"\xAA" * max(0, -lo) + chunk + b"\xAA" * (16 - max(0, -lo) - len(chunk))
        words = np.frombuffer(out, np.uint32)
        word, bits = shift >> 2, (shift & 3) * 8
        result = []
        for i in range(4):  # __funnelshift_r(v[i], v[i + 1], bits)
            lo_word = int(words[word + i])
            hi_word = int(words[word + i + 1]) if word + i + 1 < len(words) else 0
            result.append((((hi_word << 32) | lo_word) >> bits) & 0xFFFFFFFF)
        return np.array(result, np.uint32).tobytes()


def gather(x, offsets, layout, fill_value, *, x_address=0x10000, out_address=0x80000, threads=256):
    """``gather`` of ``patches.cu`` with its plan: returns the patches (layout's shape, x's dtype)."""
    plan = gp.gather_plan(layout, x.dtype.itemsize, threads)
    g = gp.geometry(layout)
    total_rows = layout.batch * g.count * g.rows * g.p0 * g.p1
    unit_rows = int(plan.tail[1])
    assert int(plan.args[0]) == total_rows // g.p1 * -(-g.p1 // unit_rows), "one unit per unit_rows rows of a plane"
    assert int(plan.args[1]) == x.nbytes, "the image bounds of the 16-byte loads"
    lanes = 1 << int(plan.tail[0])
    assert lanes * int(plan.tail[2]) * 16 >= g.width * x.dtype.itemsize + 16, "slots for every chunk of a row"
    item = x.dtype.itemsize
    width, image_width = g.width, g.image_width
    assert x_address % item == 0 and out_address % item == 0
    image = ByteMemory(np.ascontiguousarray(x).tobytes(), x_address)
    out = bytearray(total_rows * width * item)
    fill = np.asarray(fill_value).tobytes()
    offset_args = gp.offset_args(offsets)
    for row in range(total_rows):
        rest = row
        i1, rest = rest % g.p1, rest // g.p1
        i0, rest = rest % g.p0, rest // g.p0
        r, bk = rest % g.rows, rest // g.rows
        b = bk // g.count
        o0, o1, o2 = patch_box(offset_args, g, b, bk - b * g.count)
        s0, s1 = o0 + i0, o1 + i1
        lo = hi = 0
        src = None
        if 0 <= s0 < g.s0 and 0 <= s1 < g.s1:
            lo = -o2 if o2 < 0 else 0
            hi = max(lo, min(image_width - o2, width))
            if hi > lo:
                image_row = ((b * g.rows + r) * g.s0 + s0) * g.s1 + s1
                src = x_address + (image_row * image_width + o2 + lo) * item
        start = out_address + row * width * item
        valid = (src, src + (hi - lo) * item) if src is not None else None
        first, last = start >> 4, (start + width * item - 1) >> 4
        for lane in range(lanes):  # the row's threads, each taking every lanes-th chunk
            for chunk in range(first + lane, last + 1, lanes):
                byte0 = (chunk << 4) - start
                e0 = 0 if byte0 <= 0 else byte0 // item
                e1 = min(width, (byte0 + 16) // item)
                if (byte0 >= 0 and (e1 - e0) * item == 16 and e0 >= lo and e1 <= hi
                        and image.load16_inside(src + (e0 - lo) * item)):
                    data = image.load16(src + (e0 - lo) * item, valid)
                else:
                    parts = []
                    for e in range(e0, e1):
                        if lo <= e < hi:
                            at = src + (e - lo) * item - x_address
                            parts.append(bytes(image.data[at:at + item]))
                        else:
                            parts.append(fill)
                    data = b"".join(parts)
                at = start - out_address + e0 * item
                out[at:at + len(data)] = data
    return np.frombuffer(bytes(out), x.dtype).reshape(layout.patches_shape)


def scatter(grad, offsets, layout, *, pixels=gp.SCATTER_PIXELS, chunk=gp.SCATTER_CHUNK):
    """The deterministic ``scatter`` of ``patches.cu`` with its plan, tile by tile (float sums in grad's dtype)."""
    plan = gp.scatter_plan(layout, pixels, chunk)
    g = gp.geometry(layout)
    tiles, tiles_w, tiles_h = (int(v) for v in plan.args[10:13])
    tile_w_log2, tile_h, pixels, chunk = (int(v) for v in plan.args[13:17])
    tile_w = 1 << tile_w_log2
    threads = plan.block[0]
    width, image_width = g.width, g.image_width
    flat = np.ascontiguousarray(grad).ravel()
    out = np.full(layout.batch * g.rows * g.s0 * g.s1 * image_width, np.nan, grad.dtype)
    written = np.zeros(out.size, np.int64)
    offset_args = gp.offset_args(offsets)
    q = np.arange(threads)[:, None] + np.arange(pixels)[None, :] * threads  # (thread, p) -> tile element
    for tile in range(tiles):
        rest = tile
        a2, rest = (rest % tiles_w) * tile_w, rest // tiles_w
        a1, rest = (rest % tiles_h) * tile_h, rest // tiles_h
        s0, rest = rest % g.s0, rest // g.s0
        r, b = rest % g.rows, rest // g.rows
        h_end, w_end = min(a1 + tile_h, g.s1), min(a2 + tile_w, image_width)
        s1 = a1 + (q >> tile_w_log2)
        w = a2 + (q & (tile_w - 1))
        mine = (s1 < h_end) & (w < w_end)
        sums = np.zeros(q.shape, grad.dtype)
        for k0 in range(0, g.count, chunk):
            hits = []  # the block scan packs the hits in thread (= patch) order
            for tid in range(min(chunk, threads)):
                k = k0 + tid
                if k >= g.count:
                    continue
                o0, o1, o2 = patch_box(offset_args, g, b, k)
                i0 = s0 - o0
                if 0 <= i0 < g.p0 and o1 < h_end and a1 < o1 + g.p1 and o2 < w_end and a2 < o2 + width:
                    hits.append(((((b * g.count + k) * g.rows + r) * g.p0 + i0) * g.p1 * width, o1, o2))
            for base, o1, o2 in hits:
                i1, t = s1 - o1, w - o2
                covered = mine & (i1 >= 0) & (i1 < g.p1) & (t >= 0) & (t < width)
                index = np.where(covered, base + i1 * width + t, 0)
                sums = np.where(covered, sums + flat[index], sums)
        target = (((b * g.rows + r) * g.s0 + s0) * g.s1 + s1) * image_width + w
        out[target[mine]] = sums[mine]
        np.add.at(written, target[mine], 1)
    assert (written == 1).all(), "every image element is written exactly once"
    return out.reshape(layout.image_shape)
