"""SIMD values for numba: 256-bit vector types and the few instructions the kernels need.

numba has no vector type, and LLVM does not find the integer dot-product
instructions (``vpmaddubsw``, ``vpmaddwd``) in plain loops over 32-element blocks. This module gives numba four
value types that live in one AVX register each::

    I8x32   32 x int8   (quantized weights, unpacked to one byte each; int8 activations)
    I16x16  16 x int16  (pair sums of byte products; per-16 scales)
    I32x8    8 x int32  (integer dot products)
    F32x8    8 x float32 (accumulators)

and ``numba.extending.intrinsic`` functions over them that emit LLVM IR: loads
at a byte offset of an array, nibble and bit unpacking, the AVX2 integer dot
products (``dot_u8_i8`` = ``vpmaddubsw``, ``dot_pairs_i16`` = ``vpmaddwd``) and
fused multiply-adds into float accumulators; and the atomics that let the
workers of one parallel region share work (``atomic_add``, ``atomic_load``,
``spin_pause``; used by ``ops.decoder_step``).

The dot products, ``sign_i8``, ``sum_halves_by8`` and ``spin_pause`` use x86 instructions; everything
else is generic LLVM IR that any target compiles (the portable kernels use ``load_u8`` and ``float32_from_bits``).
Importing this module is safe anywhere: intrinsics are compiled only when a
kernel that calls them is, and ``quants.kernels`` compiles their users only on
CPUs with AVX2.

Byte offsets are flat: ``offset`` counts bytes from the start of the array's
data, so arrays passed here must be C-contiguous (the callers make sure).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

_i8, _i16, _i32, _i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_f32 = ir.FloatType()


class _VectorType(types.Type):
    """A numba type whose LLVM representation is one vector register."""

    llvm_type: ir.VectorType

    def __init__(self):
        super().__init__(name=self.__class__.__name__)


class I8x32(_VectorType):
    llvm_type = ir.VectorType(_i8, 32)


class I16x16(_VectorType):
    llvm_type = ir.VectorType(_i16, 16)


class I32x8(_VectorType):
    llvm_type = ir.VectorType(_i32, 8)


class F32x8(_VectorType):
    llvm_type = ir.VectorType(_f32, 8)


i8x32, i16x16, i32x8, f32x8 = I8x32(), I16x16(), I32x8(), F32x8()


class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, fe_type.llvm_type)


for _cls in (I8x32, I16x16, I32x8, F32x8):
    register_model(_cls)(_VectorModel)


# --------------------------------------------------------------------------- IR helpers

def _byte_pointer(context, builder, array_type, array, offset):
    """``(uint8*) array.data + offset``."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(builder.bitcast(data, _i8.as_pointer()), [offset])


def _load(builder, pointer, llvm_type):
    return builder.load(builder.bitcast(pointer, llvm_type.as_pointer()), align=1)


def _call(builder, name, return_type, args):
    function_type = ir.FunctionType(return_type, [a.type for a in args])
    function = cgutils.get_or_insert_function(builder.module, function_type, name)
    return builder.call(function, args)


def _splat(builder, value, vector_type):
    """A vector with every lane = ``value`` (already of the lane type)."""
    undef = ir.Constant(vector_type, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(_i32, 0))
    mask = ir.Constant(ir.VectorType(_i32, vector_type.count), [0] * vector_type.count)
    return builder.shuffle_vector(one, undef, mask)


def _as_lane(builder, value, lane_type):
    """Truncate or extend an integer argument to the lane width."""
    if value.type.width > lane_type.width:
        return builder.trunc(value, lane_type)
    if value.type.width < lane_type.width:
        return builder.sext(value, lane_type)
    return value


def _const_vector(llvm_type, value):
    return ir.Constant(llvm_type, [value] * llvm_type.count)


# --------------------------------------------------------------------------- loads

def _vector_load(vector_type):
    """Codegen of ``(array, offset)`` -> the ``vector_type`` value at byte ``offset`` of the array."""
    def codegen(context, builder, sig, args):
        return _load(builder, _byte_pointer(context, builder, sig.args[0], *args), vector_type.llvm_type)
    return codegen


@intrinsic
def load_i8x32(typingctx, array, offset):
    """32 bytes of ``array`` starting at byte ``offset``."""
    return i8x32(array, offset), _vector_load(I8x32)


@intrinsic
def load_nibbles(typingctx, array, offset):
    """16 bytes at ``offset`` -> 32 values: the 16 low nibbles, then the 16 high nibbles."""
    def codegen(context, builder, sig, args):
        v16 = ir.VectorType(_i8, 16)
        packed = _load(builder, _byte_pointer(context, builder, sig.args[0], *args), v16)
        # both 128-bit halves hold the 16 bytes (vbroadcasti128); the high half's words shift by 4 (vpsrlvd)
        twice = builder.shuffle_vector(packed, packed, ir.Constant(ir.VectorType(_i32, 32), list(range(16)) * 2))
        v8 = I32x8.llvm_type
        shifted = builder.lshr(builder.bitcast(twice, v8), ir.Constant(v8, [0, 0, 0, 0, 4, 4, 4, 4]))
        return builder.and_(builder.bitcast(shifted, I8x32.llvm_type), _const_vector(I8x32.llvm_type, 0x0F))
    return i8x32(array, offset), codegen


@intrinsic
def load_f16(typingctx, array, offset):
    """The IEEE half at byte ``offset`` as float32."""
    def codegen(context, builder, sig, args):
        half = _load(builder, _byte_pointer(context, builder, sig.args[0], *args), _i16)
        return builder.fpext(builder.bitcast(half, ir.HalfType()), _f32)
    return types.float32(array, offset), codegen


@intrinsic
def load_bits(typingctx, array, offset, value):
    """The little-endian 32-bit mask at ``offset`` -> 32 bytes: byte j = ``value`` if bit j is set, else 0."""
    def codegen(context, builder, sig, args):
        v4 = ir.VectorType(_i8, 4)
        v32 = I8x32.llvm_type
        mask_bytes = _load(builder, _byte_pointer(context, builder, sig.args[0], args[0], args[1]), v4)
        spread = builder.shuffle_vector(mask_bytes, ir.Constant(v4, ir.Undefined),
                                        ir.Constant(ir.VectorType(_i32, 32), [j // 8 for j in range(32)]))
        bit = builder.and_(spread, ir.Constant(v32, [1 << (j % 8) for j in range(32)]))
        is_set = builder.icmp_unsigned("!=", bit, ir.Constant(v32, [0] * 32))
        lane = _splat(builder, _as_lane(builder, args[2], _i8), v32)
        return builder.select(is_set, lane, ir.Constant(v32, [0] * 32))
    return i8x32(array, offset, value), codegen


# --------------------------------------------------------------------------- byte arithmetic

@intrinsic
def shift_right_and(typingctx, v, shift, mask):
    """``(v >> shift) & mask`` on unsigned bytes."""
    def codegen(context, builder, sig, args):
        v32 = I8x32.llvm_type
        shift_v = _splat(builder, _as_lane(builder, args[1], _i8), v32)
        mask_v = _splat(builder, _as_lane(builder, args[2], _i8), v32)
        return builder.and_(builder.lshr(args[0], shift_v), mask_v)
    return i8x32(v, shift, mask), codegen


@intrinsic
def or_shifted(typingctx, low, high, shift):
    """``low | (high << shift)`` on bytes."""
    def codegen(context, builder, sig, args):
        v32 = I8x32.llvm_type
        shift_v = _splat(builder, _as_lane(builder, args[2], _i8), v32)
        return builder.or_(args[0], builder.shl(args[1], shift_v))
    return i8x32(low, high, shift), codegen


# --------------------------------------------------------------------------- 16-bit lanes

@intrinsic
def load_i16x16(typingctx, array, offset):
    """16 int16 values at byte ``offset``."""
    return i16x16(array, offset), _vector_load(I16x16)


# --------------------------------------------------------------------------- float accumulators

@intrinsic
def zeros_f32x8(typingctx):
    def codegen(context, builder, sig, args):
        return _const_vector(F32x8.llvm_type, 0.0)
    return f32x8(), codegen


@intrinsic
def horizontal_sum(typingctx, v):
    """Sum of the 8 lanes (pairwise) as float32."""
    def codegen(context, builder, sig, args):
        value = args[0]
        for width in (4, 2, 1):
            low = builder.shuffle_vector(value, value, ir.Constant(ir.VectorType(_i32, width), list(range(width))))
            high = builder.shuffle_vector(value, value,
                                          ir.Constant(ir.VectorType(_i32, width), list(range(width, 2 * width))))
            value = builder.fadd(low, high)
        return builder.extract_element(value, ir.Constant(_i32, 0))
    return types.float32(v), codegen


# --------------------------------------------------------------------------- scalars (generic IR)

@intrinsic
def load_u8(typingctx, array, offset):
    """The unsigned byte at ``offset``, as int64."""
    def codegen(context, builder, sig, args):
        byte = builder.load(_byte_pointer(context, builder, sig.args[0], *args))
        return builder.zext(byte, _i64)
    return types.int64(array, offset), codegen


@intrinsic
def load_i8(typingctx, array, offset):
    """The signed byte at ``offset``, as int64."""
    def codegen(context, builder, sig, args):
        byte = builder.load(_byte_pointer(context, builder, sig.args[0], *args))
        return builder.sext(byte, _i64)
    return types.int64(array, offset), codegen


@intrinsic
def float32_from_bits(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32."""
    def codegen(context, builder, sig, args):
        bits = args[0]
        bits = builder.trunc(bits, _i32) if bits.type.width > 32 else builder.zext(bits, _i32) \
            if bits.type.width < 32 else bits
        return builder.bitcast(bits, _f32)
    return types.float32(bits), codegen


# --------------------------------------------------------------------------- integer lanes to float

@intrinsic
def to_f32x8(typingctx, v):
    """int32 lanes -> float32 lanes (round to nearest)."""
    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], F32x8.llvm_type)
    return f32x8(v), codegen


@intrinsic
def splat_f32x8(typingctx, value):
    """Eight lanes of the float32 ``value``."""
    def codegen(context, builder, sig, args):
        return _splat(builder, args[0], F32x8.llvm_type)
    return f32x8(types.float32), codegen


@intrinsic
def pack_f32x8(typingctx, v0, v1, v2, v3, v4, v5, v6, v7):
    """The eight float32 scalars as the lanes of one vector."""
    def codegen(context, builder, sig, args):
        vector = ir.Constant(F32x8.llvm_type, ir.Undefined)
        for lane, value in enumerate(args):
            vector = builder.insert_element(vector, value, ir.Constant(_i32, lane))
        return vector
    return f32x8(*([types.float32] * 8)), codegen


@intrinsic
def load_f32x8(typingctx, array, offset):
    """Eight float32 values at byte ``offset``."""
    return f32x8(array, offset), _vector_load(F32x8)


@intrinsic
def add_f32x8(typingctx, a, b):
    """Lane-wise float32 sum (one rounding)."""
    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])
    return f32x8(a, b), codegen


@intrinsic
def mul_f32x8(typingctx, a, b):
    """Lane-wise float32 product (one rounding)."""
    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1])
    return f32x8(a, b), codegen


@intrinsic
def fma_f32x8(typingctx, a, b, c):
    """Lane-wise ``a * b + c`` with one rounding (``llvm.fma``)."""
    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.fma.v8f32", F32x8.llvm_type, list(args))
    return f32x8(a, b, c), codegen


@intrinsic
def fma_f32(typingctx, a, b, c):
    """Scalar float32 ``a * b + c`` with one rounding: the same operation as a lane of ``fma_f32x8``."""
    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.fma.f32", _f32, list(args))
    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def lane_f32(typingctx, v, lane):
    """Lane ``lane`` of a float32 vector."""
    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], _as_lane(builder, args[1], _i32))
    return types.float32(v, lane), codegen


@intrinsic
def prefetch(typingctx, array, offset):
    """Hint the cache line at byte ``offset`` of ``array`` into the caches (``llvm.prefetch``; never faults,
    so the offset may run past the array's end)."""
    def codegen(context, builder, sig, args):
        pointer = _byte_pointer(context, builder, sig.args[0], *args)
        _call(builder, "llvm.prefetch.p0i8", ir.VoidType(),
              [pointer, ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)])
        return context.get_dummy_value()
    return types.none(array, offset), codegen


@intrinsic
def load_f16x8_strided(typingctx, array, offset, stride):
    """The eight IEEE halves at bytes ``offset + k * stride`` (k = 0..7) as float32 lanes: eight 16-bit
    loads into one vector, then one conversion (``vcvtph2ps``) instead of eight."""
    def codegen(context, builder, sig, args):
        array_value, start, step = args
        v8h = ir.VectorType(_i16, 8)
        halves = ir.Constant(v8h, ir.Undefined)
        for lane in range(8):
            at = builder.add(start, builder.mul(step, ir.Constant(step.type, lane)))
            bits = _load(builder, _byte_pointer(context, builder, sig.args[0], array_value, at), _i16)
            halves = builder.insert_element(halves, bits, ir.Constant(_i32, lane))
        return builder.fpext(builder.bitcast(halves, ir.VectorType(ir.HalfType(), 8)), F32x8.llvm_type)
    return f32x8(array, types.int64, types.int64), codegen


@intrinsic
def load_f16_pairs_x8_strided(typingctx, array, offset, stride):
    """The eight pairs of IEEE halves at bytes ``offset + k * stride`` (k = 0..7; a pair = 4 bytes) as two float32
    vectors (first halves, second halves), lane k from pair k: eight 32-bit loads into one vector, two
    conversions (``vcvtph2ps``) and two shuffles (Q4_1's and Q5_1's d and m, the K types' d and dmin, read
    together). The pairs are loaded in lane order 0 1 4 5 2 3 6 7, so that after
    the conversions one in-lane shuffle (``vshufps``) per result puts them in order."""
    def codegen(context, builder, sig, args):
        array_value, start, step = args
        v8i = ir.VectorType(_i32, 8)
        words = ir.Constant(v8i, ir.Undefined)
        for lane, k in enumerate((0, 1, 4, 5, 2, 3, 6, 7)):
            at = builder.add(start, builder.mul(step, ir.Constant(step.type, k)))
            bits = _load(builder, _byte_pointer(context, builder, sig.args[0], array_value, at), _i32)
            words = builder.insert_element(words, bits, ir.Constant(_i32, lane))
        halves = builder.bitcast(words, ir.VectorType(ir.HalfType(), 16))
        mask8 = ir.VectorType(_i32, 8)
        low = builder.fpext(builder.shuffle_vector(halves, halves, ir.Constant(mask8, list(range(8)))),
                            F32x8.llvm_type)     # pairs 0 1 4 5: d0 m0 d1 m1 | d4 m4 d5 m5
        high = builder.fpext(builder.shuffle_vector(halves, halves, ir.Constant(mask8, list(range(8, 16)))),
                             F32x8.llvm_type)    # pairs 2 3 6 7: d2 m2 d3 m3 | d6 m6 d7 m7
        first = builder.shuffle_vector(low, high, ir.Constant(mask8, [0, 2, 8, 10, 4, 6, 12, 14]))
        second = builder.shuffle_vector(low, high, ir.Constant(mask8, [1, 3, 9, 11, 5, 7, 13, 15]))
        return context.make_tuple(builder, sig.return_type, (first, second))
    return types.UniTuple(f32x8, 2)(array, types.int64, types.int64), codegen


# --------------------------------------------------------------------------- atomics (one parallel region, shared work)

def _int64_pointer(context, builder, array_type, array, index, index_type):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [context.cast(builder, index, index_type, types.int64)])


@intrinsic
def atomic_add(typingctx, array, index, value):
    """``old = array[index]; array[index] += value`` as one sequentially consistent step; returns ``old``.
    array: int64, C-contiguous."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        pointer = _int64_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        amount = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", pointer, amount, "seq_cst")
    return types.int64(array, index, value), codegen


@intrinsic
def borrowed(typingctx, array):
    """The same array (data, shape, strides) without its owner: numba's meminfo and parent pointers set to null.

    numba counts references to an array with atomic increments and decrements of its meminfo. Workers of
    one parallel launch that pass the same arrays to the functions they call (through function pointers,
    which numba cannot see through) increment and decrement the same counters, and each atomic step on a
    cache line the other core holds costs a transfer: a quarter of a decode step's CPU time went there.
    Reference counting skips a null meminfo. Only for arrays their owner keeps alive for as long as the
    result is used (a launch's arguments, held by its Python caller)."""
    if not isinstance(array, types.Array):
        return None

    def codegen(context, builder, sig, args):
        value = args[0]
        meminfo_type, parent_type = value.type.elements[0], value.type.elements[1]
        value = builder.insert_value(value, ir.Constant(meminfo_type, None), 0)
        return builder.insert_value(value, ir.Constant(parent_type, None), 1)
    return array(array), codegen


@intrinsic
def atomic_load(typingctx, array, index):
    """``array[index]`` read atomically with acquire order (what other threads wrote before their
    ``atomic_add`` of it is visible after). array: int64, C-contiguous."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        pointer = _int64_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        return builder.load_atomic(pointer, "acquire", 8)
    return types.int64(array, index), codegen


@intrinsic
def spin_pause(typingctx):
    """The x86 ``pause`` hint for a spin-wait loop (``llvm.x86.sse2.pause``)."""
    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.sse2.pause", ir.VoidType(), [])
        return context.get_dummy_value()
    return types.none(), codegen


# --------------------------------------------------------------------------- 32-bit lanes: scale fields of eight rows

@intrinsic
def load_u32x8_strided(typingctx, array, offset, stride):
    """The eight little-endian 32-bit words at bytes ``offset + k * stride`` (k = 0..7) as int32 lanes: four
    packed scale bytes of each of eight weight rows, side by side."""
    def codegen(context, builder, sig, args):
        array_value, start, step = args
        words = ir.Constant(I32x8.llvm_type, ir.Undefined)
        for lane in range(8):
            at = builder.add(start, builder.mul(step, ir.Constant(step.type, lane)))
            word = _load(builder, _byte_pointer(context, builder, sig.args[0], array_value, at), _i32)
            words = builder.insert_element(words, word, ir.Constant(_i32, lane))
        return words
    return i32x8(array, types.int64, types.int64), codegen


@intrinsic
def bits_i32x8(typingctx, v, shift, mask):
    """``(v >> shift) & mask`` lane-wise on unsigned 32-bit lanes (shift 0..31)."""
    def codegen(context, builder, sig, args):
        v8 = I32x8.llvm_type
        shift_v = _splat(builder, _as_lane(builder, args[1], _i32), v8)
        mask_v = _splat(builder, _as_lane(builder, args[2], _i32), v8)
        return builder.and_(builder.lshr(args[0], shift_v), mask_v)
    return i32x8(v, shift, mask), codegen


@intrinsic
def signed_byte_i32x8(typingctx, v, byte):
    """Byte ``byte`` (0..3) of each 32-bit lane, sign-extended to int32."""
    def codegen(context, builder, sig, args):
        v8 = I32x8.llvm_type
        up = builder.sub(ir.Constant(_i32, 24), builder.mul(_as_lane(builder, args[1], _i32), ir.Constant(_i32, 8)))
        return builder.ashr(builder.shl(args[0], _splat(builder, up, v8)), _const_vector(v8, 24))
    return i32x8(v, byte), codegen


@intrinsic
def or_i32x8(typingctx, a, b):
    """Lane-wise bitwise or of two int32 vectors."""
    def codegen(context, builder, sig, args):
        return builder.or_(args[0], args[1])
    return i32x8(a, b), codegen


@intrinsic
def add_i32x8(typingctx, a, b):
    """Lane-wise int32 sum (wraps; the integer dot products stay far below it)."""
    def codegen(context, builder, sig, args):
        return builder.add(args[0], args[1])
    return i32x8(a, b), codegen


@intrinsic
def mul_i32x8(typingctx, a, b):
    """Lane-wise int32 product, low 32 bits (``vpmulld``)."""
    def codegen(context, builder, sig, args):
        return builder.mul(args[0], args[1])
    return i32x8(a, b), codegen


@intrinsic
def splat_i32x8(typingctx, value):
    """Eight lanes of the integer ``value`` (truncated to 32 bits)."""
    def codegen(context, builder, sig, args):
        return _splat(builder, _as_lane(builder, args[0], _i32), I32x8.llvm_type)
    return i32x8(value), codegen


@intrinsic
def negate_f32x8(typingctx, v):
    """Lane-wise ``-v`` (exact: the sign bit flipped)."""
    def codegen(context, builder, sig, args):
        return builder.fsub(_const_vector(F32x8.llvm_type, -0.0), args[0])
    return f32x8(v), codegen


@intrinsic
def sum_halves_by8(typingctx, a0, a1, a2, a3, a4, a5, a6, a7):
    """(lane l = the sum of lanes 0-3 of ``a_l``, lane l = the sum of lanes 4-7), int32, exact: after
    ``dot_u8_i8`` and ``dot_pairs_i16``, lanes 0-3 hold a block's first 16 elements and lanes 4-7 its last 16.

    Two rounds of ``vphaddd`` (pairwise sums within 128-bit halves) leave each vector's two half-sums in the two
    halves; two cross-half shuffles gather them: eight rows' (or tokens') dot products in one vector."""
    def codegen(context, builder, sig, args):
        def hadd(x, y):
            return _call(builder, "llvm.x86.avx2.phadd.d", I32x8.llvm_type, [x, y])

        q0123 = hadd(hadd(args[0], args[1]), hadd(args[2], args[3]))
        q4567 = hadd(hadd(args[4], args[5]), hadd(args[6], args[7]))
        mask = ir.VectorType(_i32, 8)
        low = builder.shuffle_vector(q0123, q4567, ir.Constant(mask, [0, 1, 2, 3, 8, 9, 10, 11]))
        high = builder.shuffle_vector(q0123, q4567, ir.Constant(mask, [4, 5, 6, 7, 12, 13, 14, 15]))
        return context.make_tuple(builder, sig.return_type, (low, high))
    return types.UniTuple(i32x8, 2)(a0, a1, a2, a3, a4, a5, a6, a7), codegen


@intrinsic
def shift_left_i32x8(typingctx, v, shift):
    """``v << shift`` lane-wise on 32-bit lanes (shift 0..31)."""
    def codegen(context, builder, sig, args):
        return builder.shl(args[0], _splat(builder, _as_lane(builder, args[1], _i32), I32x8.llvm_type))
    return i32x8(v, shift), codegen


# --------------------------------------------------------------------------- stores and the interleaved weight strip

@intrinsic
def store_vector(typingctx, array, offset, v):
    """Write the 32 bytes of ``v`` (any of the vector types) at byte ``offset`` of ``array`` (any dtype;
    C-contiguous)."""
    if not isinstance(v, _VectorType):
        return None

    def codegen(context, builder, sig, args):
        array_value, start, value = args
        pointer = builder.bitcast(_byte_pointer(context, builder, sig.args[0], array_value, start),
                                  value.type.as_pointer())
        builder.store(value, pointer, align=1)
        return context.get_dummy_value()
    return types.none(array, offset, v), codegen


@intrinsic
def transpose_words(typingctx, a0, a1, a2, a3, a4, a5, a6, a7):
    """An 8 x 8 transpose of 32-bit words (vectors of any one type): word k of result i = word i of ``a_k``.
    With ``a_k`` the 32 int8 quants of a block of weight row k, result i holds elements 4i..4i + 3 of every row,
    row k in word k (unpack 32, unpack 64, then 128-bit halves)."""
    def codegen(context, builder, sig, args):
        v8 = I32x8.llvm_type
        mask = ir.VectorType(_i32, 8)
        rows = [builder.bitcast(a, v8) for a in args]

        def shuffle(x, y, lanes):
            return builder.shuffle_vector(x, y, ir.Constant(mask, lanes))

        # unpacklo/hi_epi32 of rows (0, 1), (2, 3), ...: [r0w0 r1w0 r0w1 r1w1 | r0w4 r1w4 r0w5 r1w5], ...
        lo32 = [shuffle(rows[k], rows[k + 1], [0, 8, 1, 9, 4, 12, 5, 13]) for k in range(0, 8, 2)]
        hi32 = [shuffle(rows[k], rows[k + 1], [2, 10, 3, 11, 6, 14, 7, 15]) for k in range(0, 8, 2)]
        # unpacklo/hi_epi64 of those for row pairs (0-1, 2-3) and (4-5, 6-7): four rows' word w in one 128-bit half
        quads = []
        for low_half, high_half in ((lo32[0], lo32[1]), (lo32[2], lo32[3]), (hi32[0], hi32[1]), (hi32[2], hi32[3])):
            quads.append((shuffle(low_half, high_half, [0, 1, 8, 9, 4, 5, 12, 13]),     # words 0 / 4 (or 2 / 6)
                          shuffle(low_half, high_half, [2, 3, 10, 11, 6, 7, 14, 15])))  # words 1 / 5 (or 3 / 7)
        # quads[0]: rows 0-3 (words 0|4, 1|5), quads[1]: rows 4-7 (same), quads[2]/[3]: words 2|6, 3|7
        out = [None] * 8
        for first, second, word in ((0, 1, 0), (2, 3, 2)):
            for part in range(2):
                x, y = quads[first][part], quads[second][part]
                out[word + part] = shuffle(x, y, [0, 1, 2, 3, 8, 9, 10, 11])
                out[word + part + 4] = shuffle(x, y, [4, 5, 6, 7, 12, 13, 14, 15])
        return context.make_tuple(builder, sig.return_type, [builder.bitcast(v, a0.llvm_type) for v in out])
    if not isinstance(a0, _VectorType) or any(a != a0 for a in (a1, a2, a3, a4, a5, a6, a7)):
        return None
    return types.UniTuple(a0, 8)(a0, a1, a2, a3, a4, a5, a6, a7), codegen


# --------------------------------------------------------------------------- int8 activations

@intrinsic
def dot_u8_i8(typingctx, weights, x):
    """``vpmaddubsw``: lane i (int16) = w[2i] x[2i] + w[2i + 1] x[2i + 1], unsigned weight bytes times signed
    activation bytes. Exact when |x| <= 127 and the weights are at most 128 (2 * 128 * 127 < 2^15): lanes 0-7
    hold the products of elements 0..15, lanes 8-15 those of 16..31."""
    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.x86.avx2.pmadd.ub.sw", I16x16.llvm_type, list(args))
    return i16x16(weights, x), codegen


@intrinsic
def dot_pairs_i16(typingctx, v, scales):
    """``vpmaddwd``: lane i (int32) = v[2i] scales[2i] + v[2i + 1] scales[2i + 1] (exact)."""
    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.x86.avx2.pmadd.wd", I32x8.llvm_type, list(args))
    return i32x8(v, scales), codegen


@intrinsic
def add_i16x16(typingctx, a, b):
    """Lane-wise int16 sum (the caller keeps it in range)."""
    def codegen(context, builder, sig, args):
        return builder.add(*args)
    return i16x16(a, b), codegen


@intrinsic
def halves_i16x16(typingctx, first, second):
    """Lanes 0-7 = ``first``, lanes 8-15 = ``second`` (the per-16 scales of a block against ``dot_u8_i8``)."""
    def codegen(context, builder, sig, args):
        v8 = ir.VectorType(_i16, 8)
        low = _splat(builder, _as_lane(builder, args[0], _i16), v8)
        high = _splat(builder, _as_lane(builder, args[1], _i16), v8)
        return builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(_i32, 16), list(range(16))))
    return i16x16(first, second), codegen


@intrinsic
def pairs_i16x16(typingctx, v0, v1, v2, v3, v4, v5, v6, v7):
    """Both int16 of 32-bit word k = ``v_k``: eight rows' scales against the eight rows' words of a strip."""
    def codegen(context, builder, sig, args):
        vector = ir.Constant(I16x16.llvm_type, ir.Undefined)
        for k, value in enumerate(args):
            lane = _as_lane(builder, value, _i16)
            vector = builder.insert_element(vector, lane, ir.Constant(_i32, 2 * k))
            vector = builder.insert_element(vector, lane, ir.Constant(_i32, 2 * k + 1))
        return vector
    return i16x16(v0, v1, v2, v3, v4, v5, v6, v7), codegen


@intrinsic
def splat_quad_i8(typingctx, array, offset):
    """The four bytes at byte ``offset`` (one 32-bit word) repeated in all eight 32-bit lanes (``vpbroadcastd``
    from memory): four activations against the same four elements of eight weight rows."""
    def codegen(context, builder, sig, args):
        word = _load(builder, _byte_pointer(context, builder, sig.args[0], *args), _i32)
        return builder.bitcast(_splat(builder, word, I32x8.llvm_type), I8x32.llvm_type)
    return i8x32(array, offset), codegen


@intrinsic
def abs_i8(typingctx, v):
    """Lane-wise |v| of signed bytes as unsigned bytes (-128 -> 128; ``vpabsb``)."""
    def codegen(context, builder, sig, args):
        negative = builder.icmp_signed("<", args[0], _const_vector(I8x32.llvm_type, 0))
        return builder.select(negative, builder.neg(args[0]), args[0])
    return i8x32(v), codegen


@intrinsic
def sign_i8(typingctx, x, signs):
    """``vpsignb``: x negated where ``signs`` < 0, zero where it is 0, else x (with ``abs_i8`` of the weights:
    signed weights against ``dot_u8_i8``)."""
    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.x86.avx2.psign.b", I8x32.llvm_type, list(args))
    return i8x32(x, signs), codegen


@intrinsic
def sum_halves_i32(typingctx, v):
    """(sum of int32 lanes 0-3, sum of lanes 4-7) as int64: a block's two 16-halves after ``dot_pairs_i16``."""
    def codegen(context, builder, sig, args):
        parts = []
        for start in (0, 4):
            value = builder.shuffle_vector(args[0], args[0], ir.Constant(ir.VectorType(_i32, 4),
                                                                         list(range(start, start + 4))))
            for width in (2, 1):
                low = builder.shuffle_vector(value, value, ir.Constant(ir.VectorType(_i32, width), list(range(width))))
                high = builder.shuffle_vector(value, value, ir.Constant(ir.VectorType(_i32, width),
                                                                        list(range(width, 2 * width))))
                value = builder.add(low, high)
            parts.append(builder.sext(builder.extract_element(value, ir.Constant(_i32, 0)), _i64))
        return context.make_tuple(builder, sig.return_type, parts)
    return types.UniTuple(types.int64, 2)(v), codegen


@intrinsic
def cycles(typingctx):
    """The CPU's time-stamp counter (``llvm.readcyclecounter``: rdtsc, a constant rate on current x86 CPUs)."""
    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.readcyclecounter", ir.IntType(64), [])
    return types.int64(), codegen
