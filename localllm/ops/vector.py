"""Eight-lane float vectors for the attention kernels, over float32 or float16 arrays.

numba handles float16 arrays poorly on CPUs, so half-precision data (the KV
cache) is passed to numba as a ``uint16`` view of the same bytes. The
functions here read and write such arrays and float32 arrays alike: the
array's dtype picks the code at compile time.

    load8(array, index)          8 elements from array.flat[index:index + 8] as F32x8
                                 (uint16 arrays: IEEE halves widened, ``fpext``)
    store8(array, index, value)  the reverse (uint16 arrays: rounded to nearest even, ``fptrunc``)
    load1 / store1               one element, as float32
    splat8(x), fma8(a, b, c)     broadcast a float32; a * b + c lane-wise
    sum_lanes8(a0, ..., a7)      one F32x8 whose lane j is the sum of the lanes of aj

All of it is generic LLVM IR: x86 with F16C converts with ``vcvtph2ps`` /
``vcvtps2ph``, ARM natively; other CPUs get LLVM's own conversion code.
``index`` counts elements from the start of the array's data, so arrays
must be C-contiguous (the callers make sure).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..quants.intrinsics import F32x8, f32x8, horizontal_sum, zeros_f32x8

__all__ = ["F32x8", "f32x8", "load8", "store8", "load1", "store1", "splat8", "fma8", "sum_lanes8",
           "horizontal_sum", "zeros_f32x8"]

_i32 = ir.IntType(32)
_f32 = ir.FloatType()
_f16 = ir.HalfType()
_V8F32 = F32x8.llvm_type
_V8F16 = ir.VectorType(_f16, 8)


def _is_half(array_type) -> bool:
    return array_type.dtype == types.uint16


def _supported(array_type) -> bool:
    return isinstance(array_type, types.Array) and array_type.dtype in (types.float32, types.uint16)


def _element_pointer(context, builder, array_type, array, index, lane_type):
    """``(lane_type*) array.data + index`` (element index)."""
    data = context.make_array(array_type)(context, builder, array).data
    element = builder.gep(data, [index])
    return builder.bitcast(element, lane_type.as_pointer())


def _load_as_float32(half_type, float_type):
    """Codegen of ``(array, index)`` -> element(s) at ``index`` as float32 (``half_type`` widened from uint16
    arrays, ``float_type`` as is from float32 arrays)."""
    def codegen(context, builder, sig, args):
        if _is_half(sig.args[0]):
            pointer = _element_pointer(context, builder, sig.args[0], *args, half_type)
            return builder.fpext(builder.load(pointer, align=2), float_type)
        return builder.load(_element_pointer(context, builder, sig.args[0], *args, float_type), align=4)
    return codegen


def _store_from_float32(half_type, float_type):
    """Codegen of ``(array, index, value)``: value (float32) stored at ``index`` (rounded to nearest even into
    uint16 arrays)."""
    def codegen(context, builder, sig, args):
        array_value, index_value, value = args
        if _is_half(sig.args[0]):
            pointer = _element_pointer(context, builder, sig.args[0], array_value, index_value, half_type)
            builder.store(builder.fptrunc(value, half_type), pointer, align=2)
        else:
            pointer = _element_pointer(context, builder, sig.args[0], array_value, index_value, float_type)
            builder.store(value, pointer, align=4)
        return context.get_dummy_value()
    return codegen


@intrinsic
def load8(typingctx, array, index):
    """array.flat[index:index + 8] as 8 float32 lanes (halves widened exactly)."""
    if not _supported(array):
        return None
    return f32x8(array, index), _load_as_float32(_V8F16, _V8F32)


@intrinsic
def store8(typingctx, array, index, value):
    """array.flat[index:index + 8] = value (halves: rounded to nearest even)."""
    if not _supported(array) or value != f32x8:
        return None
    return types.none(array, index, value), _store_from_float32(_V8F16, _V8F32)


@intrinsic
def load1(typingctx, array, index):
    """array.flat[index] as float32."""
    if not _supported(array):
        return None
    return types.float32(array, index), _load_as_float32(_f16, _f32)


@intrinsic
def store1(typingctx, array, index, value):
    """array.flat[index] = value (a float32; halves: rounded to nearest even)."""
    if not _supported(array):
        return None
    return types.none(array, index, types.float32), _store_from_float32(_f16, _f32)


@intrinsic
def store_halves4(typingctx, array, low_index, high_index, value):
    """array.flat[low_index:low_index + 4] = lanes 0-3 of value, array.flat[high_index:high_index + 4] = lanes 4-7
    (float32 arrays)."""
    if not (isinstance(array, types.Array) and array.dtype == types.float32) or value != f32x8:
        return None

    def codegen(context, builder, sig, args):
        array_value, low, high, vector = args
        v4 = ir.VectorType(_f32, 4)
        for index, lanes in ((low, [0, 1, 2, 3]), (high, [4, 5, 6, 7])):
            part = builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(_i32, 4), lanes))
            builder.store(part, _element_pointer(context, builder, sig.args[0], array_value, index, v4), align=4)
        return context.get_dummy_value()
    return types.none(array, low_index, high_index, value), codegen


@intrinsic
def splat8(typingctx, x):
    """8 lanes equal to the float32 ``x``."""
    def codegen(context, builder, sig, args):
        scalar = context.cast(builder, args[0], sig.args[0], types.float32)
        one = builder.insert_element(ir.Constant(_V8F32, ir.Undefined), scalar, ir.Constant(_i32, 0))
        return builder.shuffle_vector(one, ir.Constant(_V8F32, ir.Undefined), ir.Constant(ir.VectorType(_i32, 8), [0] * 8))
    return f32x8(x), codegen


@intrinsic
def fma8(typingctx, a, b, c):
    """``a * b + c`` lane-wise (``llvm.fmuladd``: one fused instruction where the CPU has it)."""
    if not (a == b == c == f32x8):
        return None

    def codegen(context, builder, sig, args):
        function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8F32, [_V8F32] * 3),
                                                  "llvm.fmuladd.v8f32")
        return builder.call(function, args)
    return f32x8(a, b, c), codegen


def _pick(builder, a, b, lanes):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_i32, 8), lanes))


@intrinsic
def sum_lanes8(typingctx, a0, a1, a2, a3, a4, a5, a6, a7):
    """Lane j of the result = sum of the 8 lanes of aj, as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).

    Eight dot products finished at once (a transpose by shuffles), instead of eight horizontal sums.
    """
    if not all(a == f32x8 for a in (a0, a1, a2, a3, a4, a5, a6, a7)):
        return None

    def codegen(context, builder, sig, args):
        # level 1: lanes (2m, 2m + 1) of b_i hold the pair sums m of a_{2i}, a_{2i+1}
        pairs = [builder.fadd(_pick(builder, args[2 * i], args[2 * i + 1], [0, 8, 2, 10, 4, 12, 6, 14]),
                              _pick(builder, args[2 * i], args[2 * i + 1], [1, 9, 3, 11, 5, 13, 7, 15]))
                 for i in range(4)]
        # level 2: lanes 0..3 / 4..7 of c_j hold the first / second half sums of a_{4j} .. a_{4j+3}
        quads = [builder.fadd(_pick(builder, pairs[2 * j], pairs[2 * j + 1], [0, 1, 8, 9, 4, 5, 12, 13]),
                              _pick(builder, pairs[2 * j], pairs[2 * j + 1], [2, 3, 10, 11, 6, 7, 14, 15]))
                 for j in range(2)]
        # level 3: both halves added, a0 .. a3 from c_0 and a4 .. a7 from c_1
        return builder.fadd(_pick(builder, quads[0], quads[1], [0, 1, 2, 3, 8, 9, 10, 11]),
                            _pick(builder, quads[0], quads[1], [4, 5, 6, 7, 12, 13, 14, 15]))
    return f32x8(a0, a1, a2, a3, a4, a5, a6, a7), codegen
