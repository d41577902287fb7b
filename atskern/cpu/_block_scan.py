"""One vectorized pass over a contiguous run of float32/float64 weights: their float64 sum in one written order,
the count of positive weights, and on request the sum of squares or the sampling kernel's rejection flags.

The sum's order (no reassociation anywhere, so every compiled copy adds alike, whatever LLVM's vectorizer would
pick):

1. ``ACCUMULATORS`` vectors of ``LANES`` float64 lanes start at 0; for each whole group of ``GROUP`` values,
   lane ``j`` of accumulator ``k`` adds value ``k * LANES + j`` of the group (the groups in turn);
2. lane by lane, ``(acc0 + acc1) + (acc2 + acc3)``;
3. over the lanes, ``((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))``;
4. the values after the last whole group, added one after another.

The sum of squares takes the same order, each square added by a fused multiply-add (``fma(v, v, acc)``, one
rounding). A float32 value widens to float64 exactly first; a NaN is not positive. Fast-math reassociation used to
give each compiled copy of a sum its own order, and the serial and the parallel sampling paths (two copies) once
differed by an ulp; the order holds inside a fast-math function too (see ``_KEEP_ORDER``).

The flags are ``atskern.cpu.sampling._flag_block``'s tests, computed alike: per position, whether its key
might lie below the bound (``scaled`` is the bound times 2**32, enlarged by ``F32_SLACK`` for float32):
``float64(2**32 - 1 - hi) < a * scaled`` for float64 weights, ``float32(hi) + a * scaled >= F32_EDGE`` in float32
for float32 weights.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from ._jit import jit

LANES = 8
ACCUMULATORS = 4
GROUP = LANES * ACCUMULATORS

F32_SLACK = 1.0 + 2.0**-20
F32_EDGE = np.float32(2.0**32 - 2048)

_KEEP_ORDER = ("arcp",)
"""Flags of every addition and product here. Numba's fast-math pass gives its flags (``reassoc`` and ``contract``
among them) to each float operation of a fast-math function that has none, an inlined scan's too; ``arcp``
(reciprocals may replace divisions) means nothing to an addition or a product, and keeps the pass off."""


def _tree(combine, values):
    """``((v0 + v1) + (v2 + v3)) + ...``: pairs, then pairs of pairs (``len(values)`` a power of two)."""
    while len(values) > 1:
        values = [combine(values[i], values[i + 1]) for i in range(0, len(values), 2)]
    return values[0]


def _scan_codegen(squares: bool, flagged: bool):
    """Code of the scan of ``values[start : start + count]``: ``(sum, positive)``, ``(sum, positive, squares)``
    with ``squares``; with ``flagged`` the arguments go on with ``hi_words, scaled, flags`` (aligned with
    ``values``) and the flags are written."""

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        intp = context.get_value_type(types.intp)
        i32 = ir.IntType(32)
        first = context.cast(builder, args[1], signature.args[1], types.intp)
        count = context.cast(builder, args[2], signature.args[2], types.intp)
        element = context.get_data_type(array_type.dtype)
        double = ir.DoubleType()
        wide = ir.VectorType(double, LANES)
        counts = ir.VectorType(i32, LANES)  # a lane counts at most count / LANES values: count below 2**35
        zero = ir.Constant(wide, [0.0] * LANES)

        def add(x, y):
            return builder.fadd(x, y, flags=_KEEP_ORDER)

        def add_square(total, x):  # a fused multiply-add (one rounding) in every compiled copy
            name = f"llvm.fma.{f'v{LANES}' if isinstance(x.type, ir.VectorType) else ''}f64"
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(x.type, [x.type] * 3), name)
            return builder.call(fma, [x, x, total])

        def widen(value):
            if element == double:
                return value
            return builder.fpext(value, wide if isinstance(value.type, ir.VectorType) else double)

        def positive(value, to):
            return builder.zext(builder.fcmp_ordered(">", value, ir.Constant(value.type, 0.0)), to)

        def load(pointer, lanes):
            """``lanes`` consecutive items from ``pointer`` (a vector unless 1; unaligned)."""
            if lanes == 1:
                return builder.load(pointer)
            item = pointer.type.pointee
            vector = builder.bitcast(pointer, ir.VectorType(item, lanes).as_pointer())
            return builder.load(vector, align=context.get_abi_sizeof(item))

        def splat(value, lanes):
            if lanes == 1:
                return value
            return builder.shuffle_vector(builder.insert_element(ir.Constant(ir.VectorType(value.type, lanes), None),
                                                                 value, ir.Constant(i32, 0)),
                                          ir.Constant(ir.VectorType(value.type, lanes), None),
                                          ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))

        base = builder.gep(array.data, [first])
        if flagged:
            hi_type, scaled_type, flags_type = signature.args[3], signature.args[4], signature.args[5]
            hi_base = builder.gep(context.make_array(hi_type)(context, builder, args[3]).data, [first])
            flags_base = builder.gep(context.make_array(flags_type)(context, builder, args[5]).data, [first])
            scaled = context.cast(builder, args[4], scaled_type, array_type.dtype)
            flag_byte = context.get_data_type(types.boolean)

        def write_flags(offset, values, lanes):
            """``flags[offset : offset + lanes]`` from ``values`` (the weights, unwidened) at that offset."""
            hi = load(builder.gep(hi_base, [offset]), lanes)
            factor = splat(scaled, lanes)
            if element == double:
                headroom = builder.uitofp(builder.sub(splat(ir.Constant(i32, 0xFFFFFFFF), lanes), hi), values.type)
                flag = builder.fcmp_ordered("<", headroom, builder.fmul(values, factor, flags=_KEEP_ORDER))
            else:
                edge = splat(ir.Constant(element, float(F32_EDGE)), lanes)
                near = builder.fadd(builder.uitofp(hi, values.type), builder.fmul(values, factor, flags=_KEEP_ORDER),
                                    flags=_KEEP_ORDER)
                flag = builder.fcmp_ordered(">=", near, edge)
            target = builder.gep(flags_base, [offset])
            if lanes > 1:
                target = builder.bitcast(target, ir.VectorType(flag_byte, lanes).as_pointer())
            builder.store(builder.zext(flag, ir.VectorType(flag_byte, lanes) if lanes > 1 else flag_byte), target,
                          align=1)

        sums = [cgutils.alloca_once_value(builder, zero) for _ in range(ACCUMULATORS)]
        squared = [cgutils.alloca_once_value(builder, zero) for _ in range(ACCUMULATORS if squares else 0)]
        positives = [cgutils.alloca_once_value(builder, ir.Constant(counts, [0] * LANES)) for _ in range(ACCUMULATORS)]
        groups = builder.udiv(count, ir.Constant(intp, GROUP))
        with cgutils.for_range(builder, groups) as loop:
            for k in range(ACCUMULATORS):
                offset = builder.add(builder.mul(loop.index, ir.Constant(intp, GROUP)), ir.Constant(intp, k * LANES))
                narrow = load(builder.gep(base, [offset]), LANES)
                if flagged:
                    write_flags(offset, narrow, LANES)
                loaded = widen(narrow)
                builder.store(add(builder.load(sums[k]), loaded), sums[k])
                if squares:
                    builder.store(add_square(builder.load(squared[k]), loaded), squared[k])
                builder.store(builder.add(builder.load(positives[k]), positive(loaded, counts)), positives[k])

        def lanes_total(accumulators):
            lanes = _tree(add, [builder.load(accumulator) for accumulator in accumulators])
            return _tree(add, [builder.extract_element(lanes, ir.Constant(i32, j)) for j in range(LANES)])

        total = cgutils.alloca_once_value(builder, lanes_total(sums))
        total_squares = cgutils.alloca_once_value(builder, lanes_total(squared) if squares else ir.Constant(double, 0))
        per_lane = _tree(builder.add, [builder.load(counted) for counted in positives])  # each below 2**32
        count_positive = cgutils.alloca_once_value(builder, _tree(builder.add, [
            builder.zext(builder.extract_element(per_lane, ir.Constant(i32, j)), intp) for j in range(LANES)]))
        done = builder.mul(groups, ir.Constant(intp, GROUP))
        with cgutils.for_range(builder, builder.sub(count, done)) as loop:
            offset = builder.add(done, loop.index)
            narrow = load(builder.gep(base, [offset]), 1)
            if flagged:
                write_flags(offset, narrow, 1)
            value = widen(narrow)
            builder.store(add(builder.load(total), value), total)
            if squares:
                builder.store(add_square(builder.load(total_squares), value), total_squares)
            builder.store(builder.add(builder.load(count_positive), positive(value, intp)), count_positive)
        results = [builder.load(total), builder.load(count_positive)]
        if squares:
            results.append(builder.load(total_squares))
        return context.make_tuple(builder, signature.return_type, results)

    return codegen


def _weights(values):
    return isinstance(values, types.Array) and values.ndim == 1 and values.dtype in (types.float32, types.float64)


def _scan_signature(values, start, count, squares: bool, extra=()):
    if not (_weights(values) and isinstance(start, types.Integer) and isinstance(count, types.Integer)):
        return None
    returned = (types.float64, types.intp) + ((types.float64,) if squares else ())
    return types.Tuple(returned)(values, start, count, *extra)


@intrinsic
def _ordered_sum(typingctx, values, start, count):
    """``(sum, positive)`` of ``values[start : start + count]``; ``values`` is 1-D with a stride of its item size
    (any Numba layout) and the caller checks the bounds."""
    signature = _scan_signature(values, start, count, squares=False)
    return None if signature is None else (signature, _scan_codegen(squares=False, flagged=False))


@intrinsic
def _ordered_sum_squares(typingctx, values, start, count):
    """:func:`_ordered_sum` and the sum of squares."""
    signature = _scan_signature(values, start, count, squares=True)
    return None if signature is None else (signature, _scan_codegen(squares=True, flagged=False))


@intrinsic
def _ordered_sum_flags(typingctx, values, start, count, hi_words, scaled, flags):
    """:func:`_ordered_sum`, writing ``flags[start : start + count]`` from ``hi_words`` (uint32) and ``scaled``
    (the module docstring's tests); all three arrays unit-stride."""
    words_ok = isinstance(hi_words, types.Array) and hi_words.ndim == 1 and hi_words.dtype == types.uint32
    flags_ok = isinstance(flags, types.Array) and flags.ndim == 1 and flags.dtype == types.boolean
    if not (words_ok and flags_ok and isinstance(scaled, types.Float) and _weights(values)):
        return None
    signature = _scan_signature(values, start, count, squares=False, extra=(hi_words, scaled, flags))
    return None if signature is None else (signature, _scan_codegen(squares=False, flagged=True))


@jit(inline="always")
def _require_unit_stride(values):
    if values.size > 1 and values.strides[0] != values.itemsize:  # (NumPy gives some runs of 0 or 1 any stride)
        raise ValueError("a block scan needs a unit-stride run of weights")


@jit(inline="always")
def ordered_sum(values, start, count):
    """``values[start : start + count]`` summed in float64 in the module's order, and the count of its positive
    values (``count`` below 2**35). ``values`` is 1-D float32 or float64 and unit-stride (a contiguous row or a
    slice of one: anything else is a ValueError); the caller guarantees the bounds."""
    _require_unit_stride(values)
    return _ordered_sum(values, start, count)


@jit(inline="always")
def ordered_sum_squares(values, start, count):
    """:func:`ordered_sum` and the sum of the squares, in the same order."""
    _require_unit_stride(values)
    return _ordered_sum_squares(values, start, count)


@jit(inline="always")
def ordered_sum_flags(values, hi_words, scaled, flags):
    """:func:`ordered_sum` of the whole of ``values``, writing ``flags[i]`` for each ``values[i]`` and
    ``hi_words[i]`` (the module docstring's tests; ``scaled`` in the weights' dtype; all three unit-stride, and
    ``hi_words`` and ``flags`` at least as long as ``values``)."""
    _require_unit_stride(values)
    _require_unit_stride(hi_words)
    _require_unit_stride(flags)
    if hi_words.size < values.size or flags.size < values.size:
        raise ValueError("a block scan needs hi_words and flags as long as its weights")
    return _ordered_sum_flags(values, 0, values.size, hi_words, scaled, flags)
