"""TensorIntrins of the NPU MAC array (registered with ``tvm.s_tir.TensorIntrin.register``).

``ioso_npu.mac16x16``: one pixel of the 16x16 int8 MAC array: ``C[j] += int32(A[i]) * int32(B[i, j])``
for 16 input channels i (reduction) and 16 output channels j; int32 accumulator
(hw_model/config.py: mac_rows = mac_cols = 16, acc_bits = 32). The implementation is the extern call
``ioso_npu_mac16x16(A, a_off, B, b_off, C, c_off)`` that :mod:`target_npu.codegen` reads back; the
group shift-add and NORM/ACT/QUANT stages follow the MAC loop nest of a layer and are emitted by the
builder (see docs/compiler.md).
"""
from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

MAC = "ioso_npu.mac16x16"
EXTERN = "ioso_npu_mac16x16"
N = 16  # MAC array side (hw_model.isa.BLOCK)


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


def register() -> None:
    """Register the intrinsics once (idempotent)."""
    try:
        TensorIntrin.get(MAC)
    except Exception:  # noqa: BLE001  (not registered yet: TVM raises its own error type)
        TensorIntrin.register(MAC, _mac_desc, _mac_impl)


register()
