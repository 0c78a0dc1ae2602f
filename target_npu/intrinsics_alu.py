"""TensorIntrins of the NPU's ALU stages (element-wise add, max / sum pooling) and of the per-channel ISG
shift-add of a depthwise conv; registered on first use (``tvm.s_tir.TensorIntrin.register``).

Each intrinsic describes one pixel of one 16-lane channel block (``N`` = 16 = ``hw_model.isa.BLOCK``);
its implementation is an extern call that :mod:`target_npu.emit_alu` reads back from the scheduled TIR
(the windows and pixels of an instruction are the loops around the call):

``ioso_npu.alu_add.<a>.<b>.<out>``
    ``C[j] = out(max(min(int32(nearbyint(fl(fl(fl(A'[j] * MA[j]) + fl(B'[j] * MB[j])) + Bias[j]))),
    L[1]), L[0]))`` with ``A' = f32(int32(A) - Z[0])`` (A read as dtype a), ``B' = f32(int32(B) - Z[1])``:
    the residual add of the contract (``hw_model.reference.add``).
    Extern ``ioso_npu_alu_add_<a>_<b>_<out>(A, B, MA, MB, Bias, Z, L, C)`` -> one ``ALU_ADD`` per call
    site and tile.
``ioso_npu.max16.<dtype>``
    ``C[j] = max(C[j], A[j])`` (one window tap of a max pool; the ``*_init`` block fills C with the dtype
    minimum). Extern ``ioso_npu_max16_<dtype>(A, C)`` -> ``ALU_MAX``.
``ioso_npu.sum16.<dtype>``
    ``C[j] = C[j] + (int32(A[j]) - Z[0])`` (one window tap of an average pool, int32 accumulator).
    Extern ``ioso_npu_sum16_<dtype>(A, Z, C)`` -> ``ALU_SUM``.
``ioso_npu.shift_add_ch.s<n>``
    Depthwise ISG step D1 -> D2 with a per-channel sign: ``C[j] = A[j] + G[j] * (A[j] >> n)``, ``G[j]``
    in {-1, 0, +1} the factor sign of channel j's group (``reference.group_shift_add``). Extern
    ``ioso_npu_shift_add_ch_s<n>(A, G, C)`` -> one ``GROUP_SHIFT_ADD(init=1)`` per run of one sign
    (``GROUP_SHIFT_ADD`` has one sign per instruction).
"""
from __future__ import annotations

from collections.abc import Callable

from tvm.script import tirx as T

from target_npu.intrinsics import N, _register, extern_of

DTYPES = ("int8", "uint8")


def add_name(a: str, b: str, out: str) -> str:
    return f"ioso_npu.alu_add.{a}.{b}.{out}"


def max_name(dtype: str) -> str:
    return f"ioso_npu.max16.{dtype}"


def sum_name(dtype: str) -> str:
    return f"ioso_npu.sum16.{dtype}"


def shift_ch_name(shift: int) -> str:
    return f"ioso_npu.shift_add_ch.s{shift}"


def _check(*dts: str) -> None:
    for dt in dts:
        if dt not in DTYPES:
            raise ValueError(f"ALU intrinsics take int8 / uint8 operands, got {dt!r}")


def _add_pair(a_dt: str, b_dt: str, out: str) -> tuple[Callable, Callable]:
    ext = extern_of(add_name(a_dt, b_dt, out))

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, z: T.handle, ma: T.handle, b: T.handle, mb: T.handle, bias: T.handle, lim: T.handle,
             c: T.handle) -> None:
        A = T.match_buffer(a, (N,), a_dt, offset_factor=1)
        Z = T.match_buffer(z, (2,), "int32", offset_factor=1)
        MA = T.match_buffer(ma, (N,), "float32", offset_factor=1)
        B = T.match_buffer(b, (N,), b_dt, offset_factor=1)
        MB = T.match_buffer(mb, (N,), "float32", offset_factor=1)
        Bias = T.match_buffer(bias, (N,), "float32", offset_factor=1)
        L = T.match_buffer(lim, (2,), "int32", offset_factor=1)
        C = T.match_buffer(c, (N,), out, offset_factor=1)
        with T.sblock("root"):
            T.reads(A[0:N], Z[0:2], MA[0:N], B[0:N], MB[0:N], Bias[0:N], L[0:2])
            T.writes(C[0:N])
            for j in T.serial(N):
                with T.sblock("update"):
                    vj = T.axis.remap("S", [j])
                    C[vj] = T.Cast(out, T.max(T.min(T.Cast("int32", T.nearbyint(
                        T.Cast("float32", T.Cast("int32", A[vj]) - Z[0]) * MA[vj]
                        + T.Cast("float32", T.Cast("int32", B[vj]) - Z[1]) * MB[vj] + Bias[vj])), L[1]), L[0]))

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, z: T.handle, ma: T.handle, b: T.handle, mb: T.handle, bias: T.handle, lim: T.handle,
             c: T.handle) -> None:
        A = T.match_buffer(a, (N,), a_dt, offset_factor=1)
        Z = T.match_buffer(z, (2,), "int32", offset_factor=1)
        MA = T.match_buffer(ma, (N,), "float32", offset_factor=1)
        B = T.match_buffer(b, (N,), b_dt, offset_factor=1)
        MB = T.match_buffer(mb, (N,), "float32", offset_factor=1)
        Bias = T.match_buffer(bias, (N,), "float32", offset_factor=1)
        L = T.match_buffer(lim, (2,), "int32", offset_factor=1)
        C = T.match_buffer(c, (N,), out, offset_factor=1)
        with T.sblock("root"):
            T.reads(A[0:N], Z[0:2], MA[0:N], B[0:N], MB[0:N], Bias[0:N], L[0:2])
            T.writes(C[0:N])
            T.evaluate(T.call_extern("int32", ext, A.data, A.elem_offset, B.data, B.elem_offset, MA.data,
                                     MA.elem_offset, MB.data, MB.elem_offset, Bias.data, Bias.elem_offset, Z.data,
                                     L.data, C.data, C.elem_offset))
    return desc, impl


def _max_pair(dt: str) -> tuple[Callable, Callable]:
    ext = extern_of(max_name(dt))

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (N,), dt, offset_factor=1)
        C = T.match_buffer(c, (N,), dt, offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:N], A[0:N])
            T.writes(C[0:N])
            for j in T.serial(N):
                with T.sblock("update"):
                    vj = T.axis.remap("S", [j])
                    C[vj] = T.max(C[vj], A[vj])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (N,), dt, offset_factor=1)
        C = T.match_buffer(c, (N,), dt, offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:N], A[0:N])
            T.writes(C[0:N])
            T.evaluate(T.call_extern("int32", ext, A.data, A.elem_offset, C.data, C.elem_offset))
    return desc, impl


def _sum_pair(dt: str) -> tuple[Callable, Callable]:
    ext = extern_of(sum_name(dt))

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, z: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (N,), dt, offset_factor=1)
        Z = T.match_buffer(z, (1,), "int32", offset_factor=1)
        C = T.match_buffer(c, (N,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:N], A[0:N], Z[0:1])
            T.writes(C[0:N])
            for j in T.serial(N):
                with T.sblock("update"):
                    vj = T.axis.remap("S", [j])
                    C[vj] = C[vj] + (T.Cast("int32", A[vj]) - Z[0])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, z: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (N,), dt, offset_factor=1)
        Z = T.match_buffer(z, (1,), "int32", offset_factor=1)
        C = T.match_buffer(c, (N,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:N], A[0:N], Z[0:1])
            T.writes(C[0:N])
            T.evaluate(T.call_extern("int32", ext, A.data, A.elem_offset, Z.data, C.data, C.elem_offset))
    return desc, impl


def _shift_ch_pair(shift: int) -> tuple[Callable, Callable]:
    ext = extern_of(shift_ch_name(shift))

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, g: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (N,), "int32", offset_factor=1)
        G = T.match_buffer(g, (N,), "int32", offset_factor=1)
        C = T.match_buffer(c, (N,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(A[0:N], G[0:N])
            T.writes(C[0:N])
            for j in T.serial(N):
                with T.sblock("update"):
                    vj = T.axis.remap("S", [j])
                    C[vj] = A[vj] + G[vj] * (A[vj] >> shift)

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, g: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (N,), "int32", offset_factor=1)
        G = T.match_buffer(g, (N,), "int32", offset_factor=1)
        C = T.match_buffer(c, (N,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(A[0:N], G[0:N])
            T.writes(C[0:N])
            T.evaluate(T.call_extern("int32", ext, A.data, A.elem_offset, G.data, G.elem_offset,
                                     C.data, C.elem_offset))
    return desc, impl


def add_intrin(a: str, b: str, out: str) -> str:
    """Name of the residual-add intrinsic for operand / output dtypes, registered on first use."""
    _check(a, b, out)
    name = add_name(a, b, out)
    _register(name, *_add_pair(a, b, out))
    return name


def max_intrin(dtype: str) -> str:
    _check(dtype)
    _register(max_name(dtype), *_max_pair(dtype))
    return max_name(dtype)


def sum_intrin(dtype: str) -> str:
    _check(dtype)
    _register(sum_name(dtype), *_sum_pair(dtype))
    return sum_name(dtype)


def shift_ch_intrin(shift: int) -> str:
    """Name of the per-channel-sign shift-add intrinsic for shifter ``shift``, registered on first use."""
    if not isinstance(shift, int) or shift < 0:
        raise ValueError(f"shift_ch_intrin: shift must be a non-negative int, got {shift!r}")
    _register(shift_ch_name(shift), *_shift_ch_pair(shift))
    return shift_ch_name(shift)
