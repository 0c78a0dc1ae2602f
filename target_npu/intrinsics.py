"""TensorIntrins of the NPU (registered with ``tvm.s_tir.TensorIntrin.register``), one per hardware stage.

Each intrinsic describes one pixel of one 16-lane output block (hw_model/config.py: ``mac_rows`` =
``mac_cols`` = 16, ``acc_bits`` = 32); its implementation is an extern call that
:mod:`target_npu.codegen` reads back from the scheduled TIR:

``ioso_npu.mac16x16``
    ``C[j] += int32(A[i]) * int32(B[i, j])`` over 16 input channels i, 16 output channels j (int8 MAC
    into int32). Extern ``ioso_npu_mac16x16(A, a_off, B, b_off, C, c_off)``.
``ioso_npu.dwmac16``
    Depthwise: ``C[j] += int32(A[j]) * int32(B[j])`` for 16 channels j (one 16-lane block-tap; the
    MAC array's diagonal). Extern ``ioso_npu_dwmac16(A, a_off, B, b_off, C, c_off)``.
``ioso_npu.shift_add.<sign>.<init|acc>.s<n>``
    The ISG accumulator step D1 -> D2 of one group: ``C[j] = shift(A[j])`` (init, the first group) or
    ``C[j] = P[j] + shift(A[j])`` (acc), ``shift(d)`` = d, d - (d >> n), d + (d >> n) for sign 0, -1, +1
    (``hw_model.reference.group_shift_add``; n = ``NPUConfig.isg_shift``, registered on first use by
    :func:`shift_add_intrin`). Extern ``ioso_npu_shift_add_<sign>_<init|acc>_s<n>(A, a_off, [P, p_off,] C, c_off)``.
``ioso_npu.norm_act_quant.<dtype>``
    ``C[j] = dtype(max(min(int32(nearbyint(f32(A[j]) * M[j] + Bias[j])), L[1]), L[0]))``: NORM, ACT and
    QUANT of the contract (``L`` = (lo, hi)). Extern ``ioso_npu_norm_act_quant_<dtype>(A, ..., C, c_off)``.

The descriptions state the arithmetic for tensorize's structural match; the values on the NPU come
from the functional simulator (``hw_model``), which implements the same contract.
"""
from __future__ import annotations

from collections.abc import Callable

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

MAC = "ioso_npu.mac16x16"
EXTERN = "ioso_npu_mac16x16"
DW_MAC = "ioso_npu.dwmac16"
DW_EXTERN = "ioso_npu_dwmac16"
N = 16  # MAC array side (hw_model.isa.BLOCK)
SIGNS = {-1: "neg", 0: "unit", 1: "pos"}
OUT_DTYPES = ("int8", "uint8")


def shift_add_name(sign: int, init: bool, shift: int) -> str:
    """Intrinsic name of the group shift-add step for ``sign`` (-1 / 0 / +1) and shifter ``shift``."""
    return f"ioso_npu.shift_add.{SIGNS[sign]}.{'init' if init else 'acc'}.s{shift}"


def norm_name(dtype: str) -> str:
    return f"ioso_npu.norm_act_quant.{dtype}"


def extern_of(intrin: str) -> str:
    """Extern symbol of an intrinsic's implementation: dots become underscores."""
    return intrin.replace(".", "_")


def group_shift(v, sign: int, shift: int):  # noqa: ANN001, ANN201  (TIR expression in, out)
    """The fixed shifter on an int32 TIR expression (contract: ``reference.group_shift_add``)."""
    if sign == 0:
        return v
    return v + (v >> shift) if sign > 0 else v - (v >> shift)


@T.prim_func(s_tir=True)
def _mac_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (N,), "int8", offset_factor=1)
    B = T.match_buffer(b, (N, N), "int8", offset_factor=1)
    C = T.match_buffer(c, (N,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:N], A[0:N], B[0:N, 0:N])
        T.writes(C[0:N])
        for j, i in T.grid(N, N):
            with T.sblock("update"):
                vj, vi = T.axis.remap("SR", [j, i])
                C[vj] = C[vj] + T.Cast("int32", A[vi]) * T.Cast("int32", B[vi, vj])


@T.prim_func(s_tir=True)
def _mac_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    sb0 = T.int32()
    sb1 = T.int32()
    A = T.match_buffer(a, (N,), "int8", offset_factor=1)
    B = T.match_buffer(b, (N, N), "int8", offset_factor=1, strides=[sb0, sb1])
    C = T.match_buffer(c, (N,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:N], A[0:N], B[0:N, 0:N])
        T.writes(C[0:N])
        T.evaluate(T.call_extern("int32", EXTERN, A.data, A.elem_offset, B.data, B.elem_offset,
                                 C.data, C.elem_offset))


@T.prim_func(s_tir=True)
def _dw_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (N,), "int8", offset_factor=1)
    B = T.match_buffer(b, (N,), "int8", offset_factor=1)
    C = T.match_buffer(c, (N,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:N], A[0:N], B[0:N])
        T.writes(C[0:N])
        for j in T.serial(N):
            with T.sblock("update"):
                vj = T.axis.remap("S", [j])
                C[vj] = C[vj] + T.Cast("int32", A[vj]) * T.Cast("int32", B[vj])


@T.prim_func(s_tir=True)
def _dw_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (N,), "int8", offset_factor=1)
    B = T.match_buffer(b, (N,), "int8", offset_factor=1)
    C = T.match_buffer(c, (N,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:N], A[0:N], B[0:N])
        T.writes(C[0:N])
        T.evaluate(T.call_extern("int32", DW_EXTERN, A.data, A.elem_offset, B.data, B.elem_offset,
                                 C.data, C.elem_offset))


def _shift_add_pair(sign: int, init: bool, shift: int) -> tuple[Callable, Callable]:
    ext = extern_of(shift_add_name(sign, init, shift))

    def sh(v):  # noqa: ANN001, ANN202
        return group_shift(v, sign, shift)

    if init:
        @T.prim_func(s_tir=True)
        def desc(a: T.handle, c: T.handle) -> None:
            A = T.match_buffer(a, (N,), "int32", offset_factor=1)
            C = T.match_buffer(c, (N,), "int32", offset_factor=1)
            with T.sblock("root"):
                T.reads(A[0:N])
                T.writes(C[0:N])
                for j in T.serial(N):
                    with T.sblock("update"):
                        vj = T.axis.remap("S", [j])
                        C[vj] = sh(A[vj])

        @T.prim_func(s_tir=True)
        def impl(a: T.handle, c: T.handle) -> None:
            A = T.match_buffer(a, (N,), "int32", offset_factor=1)
            C = T.match_buffer(c, (N,), "int32", offset_factor=1)
            with T.sblock("root"):
                T.reads(A[0:N])
                T.writes(C[0:N])
                T.evaluate(T.call_extern("int32", ext, A.data, A.elem_offset, C.data, C.elem_offset))
        return desc, impl

    @T.prim_func(s_tir=True)
    def desc_acc(a: T.handle, p: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (N,), "int32", offset_factor=1)
        P = T.match_buffer(p, (N,), "int32", offset_factor=1)
        C = T.match_buffer(c, (N,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(P[0:N], A[0:N])
            T.writes(C[0:N])
            for j in T.serial(N):
                with T.sblock("update"):
                    vj = T.axis.remap("S", [j])
                    C[vj] = P[vj] + sh(A[vj])

    @T.prim_func(s_tir=True)
    def impl_acc(a: T.handle, p: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (N,), "int32", offset_factor=1)
        P = T.match_buffer(p, (N,), "int32", offset_factor=1)
        C = T.match_buffer(c, (N,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(P[0:N], A[0:N])
            T.writes(C[0:N])
            T.evaluate(T.call_extern("int32", ext, A.data, A.elem_offset, P.data, P.elem_offset,
                                     C.data, C.elem_offset))
    return desc_acc, impl_acc


def _norm_pair(dtype: str) -> tuple[Callable, Callable]:
    ext = extern_of(norm_name(dtype))

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, m: T.handle, b: T.handle, lim: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (N,), "int32", offset_factor=1)
        M = T.match_buffer(m, (N,), "float32", offset_factor=1)
        Bias = T.match_buffer(b, (N,), "float32", offset_factor=1)
        L = T.match_buffer(lim, (2,), "int32", offset_factor=1)
        C = T.match_buffer(c, (N,), dtype, offset_factor=1)
        with T.sblock("root"):
            T.reads(A[0:N], M[0:N], Bias[0:N], L[0:2])
            T.writes(C[0:N])
            for j in T.serial(N):
                with T.sblock("update"):
                    vj = T.axis.remap("S", [j])
                    C[vj] = T.Cast(dtype, T.max(T.min(T.Cast("int32", T.nearbyint(
                        T.Cast("float32", A[vj]) * M[vj] + Bias[vj])), L[1]), L[0]))

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, m: T.handle, b: T.handle, lim: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (N,), "int32", offset_factor=1)
        M = T.match_buffer(m, (N,), "float32", offset_factor=1)
        Bias = T.match_buffer(b, (N,), "float32", offset_factor=1)
        L = T.match_buffer(lim, (2,), "int32", offset_factor=1)
        C = T.match_buffer(c, (N,), dtype, offset_factor=1)
        with T.sblock("root"):
            T.reads(A[0:N], M[0:N], Bias[0:N], L[0:2])
            T.writes(C[0:N])
            T.evaluate(T.call_extern("int32", ext, A.data, A.elem_offset, M.data, M.elem_offset, Bias.data,
                                     Bias.elem_offset, L.data, C.data, C.elem_offset))
    return desc, impl


def _register(name: str, desc: Callable, impl: Callable) -> None:
    try:
        TensorIntrin.get(name)
    except Exception:  # noqa: BLE001  (not registered yet: TVM raises its own error type)
        TensorIntrin.register(name, desc, impl)


def shift_add_intrin(sign: int, init: bool, shift: int) -> str:
    """Name of the shift-add intrinsic for (sign, init, shift), registered on first use."""
    if sign not in SIGNS:
        raise ValueError(f"shift_add_intrin: sign must be -1, 0 or +1, got {sign!r}")
    name = shift_add_name(sign, init, shift)
    _register(name, *_shift_add_pair(sign, init, shift))
    return name


def register() -> None:
    """Register the MAC, depthwise MAC and NORM/ACT/QUANT intrinsics once (idempotent)."""
    _register(MAC, _mac_desc, _mac_impl)
    _register(DW_MAC, _dw_desc, _dw_impl)
    for dt in OUT_DTYPES:
        _register(norm_name(dt), *_norm_pair(dt))


register()
