"""``copy_run``: a run of elements copied with LLVM's memcpy when both sides are unit-stride (Numba's
element loops copying small integer types do not vectorize, and are several times slower), element
by element otherwise (strided, reversed or broadcast views)."""

from __future__ import annotations

from numba.core import cgutils, types
from numba.extending import intrinsic

from ._jit import jit


@intrinsic
def _memcpy_run(typingctx, dst, dst_start, src, src_start, count):
    """``dst[dst_start : dst_start + count] = src[src_start : src_start + count]`` for 1-D arrays of one
    dtype whose stride is their item size (any Numba layout; the caller checks the strides and the bounds)."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.dtype == src.dtype):
        return None
    if dst.ndim != 1 or src.ndim != 1:
        return None
    sig = types.void(dst, dst_start, src, src_start, count)

    def codegen(context, builder, signature, args):
        dst_type, _, src_type, _, _ = signature.args
        dst_array = context.make_array(dst_type)(context, builder, args[0])
        src_array = context.make_array(src_type)(context, builder, args[2])
        to_intp = [context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 3, 4)]
        itemsize = context.get_abi_sizeof(context.get_data_type(dst_type.dtype))
        dst_ptr = builder.gep(dst_array.data, [to_intp[0]])
        src_ptr = builder.gep(src_array.data, [to_intp[1]])
        cgutils.raw_memcpy(builder, dst_ptr, src_ptr, to_intp[2], itemsize)
        return context.get_dummy_value()

    return sig, codegen


@jit(inline="always")
def copy_run(dst, dst_start, src, src_start, count):
    """``dst[dst_start : dst_start + count] = src[src_start : src_start + count]`` for 1-D arrays of one dtype
    and any strides; the caller guarantees the bounds and that the two do not overlap."""
    if dst.strides[0] == dst.itemsize and src.strides[0] == src.itemsize:
        _memcpy_run(dst, dst_start, src, src_start, count)
    else:
        for t in range(count):
            dst[dst_start + t] = src[src_start + t]
