"""The folded integer form of an NPU layer in Relax: what ``FoldQDQ`` emits and the pattern table matches.

Each layer of the contract (``hw_model.reference``) is written with plain Relax ops on integers, so a
printed module says what the NPU computes. For a layer named ``n`` (``conv3``, ``add7``, ...):

- operand: ``n_in<k> = astype(x_k, "int16")``, ``n_xs<k> = subtract(n_in<k>, zp_k)`` (``x - zp``, 9 bits);
- conv / linear, per ISG group g present (contract order: scaled groups, then unity):
  ``n_d1_g<g> = conv2d(n_xs0, W_g, ..., out_dtype="int32")`` (or ``matmul(reshape(n_xs0), W_g^T)``),
  with ``W_g`` the int16 weights of the input channels in group g (zero elsewhere); a scaled group
  goes through the fixed shifter ``n_d2_g<g> = add|subtract(d1, right_shift(d1, isg_shift))``; the
  groups are summed by ``add`` into D2;
- global average pool: ``sum(astype(x, "int32") - zp, axis=[2, 3])`` (``n_in0`` is the int32 cast;
  ``keepdims`` false for an (N, C) output, a ``ReduceMean(keepdims=0)``); average pool: the same int32
  operand into ``n_acc = conv2d(xs, ones(C, 1, KH, KW), strides, groups=C, out_dtype="int32")``, the exact
  window sum (Relax has no sum pool; ``avg_pool2d`` divides); the MAC layers' operands are int16, the pools'
  int32, so each pattern matches its own kind only;
- NORM: ``add(multiply(astype(acc, "float32"), m), b)``; the add:
  ``add(add(multiply(float(a - zp_a), ma), multiply(float(b - zp_b), mb)), bias)``;
- ACT + QUANT: ``n_clip = clip(round(t), lo, hi)`` and the layer's output ``astype(n_clip, out_dtype)``,
  bound to the variable the model's ``quantize`` was bound to; max pool is
  ``n_in0 = max_pool2d(x)``, ``n_clip = clip(n_in0, lo, hi)``, ``astype`` (a clip between two equal
  quantizers is a 1x1 max pool).

The names carry the layer through ``FuseOpsByPattern`` and ``MergeCompositeFunctions`` (which keep inner
binding names): :func:`layer_name_of` reads a layer's name from a composite function and
:func:`operands_of` its operands. The ops are exact integer arithmetic up to NORM; the CPU never runs
this form (a layer left on the CPU is replaced by the contract's function, ``target_npu.partition``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import DFPattern, is_const, is_op, wildcard
from tvm.relax.expr_functor import PyExprMutator, mutator

from hw_model.config import NPUConfig
from hw_model.layer_specs import AddSpec, ConvSpec, LinearSpec, PoolSpec

Emit = Callable[[relax.Expr, str], relax.Expr]
"""``emit(expr, name)``: bind ``expr`` to a new variable called ``name`` and return the variable."""


def _const(a: Any, dtype: str) -> relax.Constant:
    return relax.const(np.asarray(a, dtype))


def _operand(emit: Emit, x: relax.Expr, zp: int, name: str, k: int) -> relax.Expr:
    xi = emit(relax.op.astype(x, "int16"), f"{name}_in{k}")
    return emit(relax.op.subtract(xi, _const(zp, "int16")), f"{name}_xs{k}")


def _per_channel(v: Any, ndim: int) -> relax.Constant:
    a = np.asarray(v, np.float32)
    return _const(a.reshape((1, -1) + (1,) * (ndim - 2)) if a.ndim else a, "float32")


def _tail(emit: Emit, t: relax.Expr, spec: Any, name: str, rounded: bool = True) -> relax.Expr:
    r = emit(relax.op.round(t), f"{name}_round") if rounded else t
    c = emit(relax.op.clip(r, int(spec.lo), int(spec.hi)), f"{name}_clip")
    return relax.op.astype(c, spec.out_dtype)


def _norm(emit: Emit, acc: relax.Expr, m: Any, b: Any, ndim: int, name: str) -> relax.Expr:
    f = emit(relax.op.astype(acc, "float32"), f"{name}_acc_f32")
    mul = emit(relax.op.multiply(f, _per_channel(m, ndim)), f"{name}_norm_mul")
    return emit(relax.op.add(mul, _per_channel(b, ndim)), f"{name}_norm")


def _group_weights(w: np.ndarray, gvec: np.ndarray, groups: int) -> np.ndarray:
    """ISG group of each weight (K, C/groups): the group of the input channel it reads."""
    k, cg = w.shape[:2]
    return np.asarray(gvec, np.int64)[(np.arange(k)[:, None] // (k // groups)) * cg + np.arange(cg)[None, :]]


def _mac(emit: Emit, xs: relax.Expr, spec: Any, name: str, cfg: NPUConfig, linear_input: bool) -> relax.Expr:
    w = np.asarray(spec.weight)
    gvec = np.zeros(spec.c, np.int64) if spec.isg_groups is None else np.asarray(spec.isg_groups, np.int64)
    groups = 1 if isinstance(spec, LinearSpec) else spec.groups
    gw = _group_weights(w if w.ndim == 4 else w[:, :, None, None], gvec, groups)
    acc = None
    for g in cfg.accumulation_order:
        if not (gw == g).any():
            continue
        wg = np.where((gw == g).reshape(gw.shape + (1,) * (w.ndim - 2)), w, 0).astype(np.int16)
        if linear_input:
            d = emit(relax.op.matmul(xs, _const(wg.T, "int16"), out_dtype="int32"), f"{name}_d1_g{g}")
        else:
            d = emit(relax.op.nn.conv2d(xs, _const(wg, "int16"), strides=list(spec.stride), padding=list(spec.pads),
                                        dilation=list(spec.dilation), groups=spec.groups, out_dtype="int32"),
                     f"{name}_d1_g{g}")
        sign = cfg.isg_group_signs[g]
        if sign:
            sh = emit(relax.op.right_shift(d, _const(cfg.isg_shift, "int32")), f"{name}_shift_g{g}")
            d = emit((relax.op.add if sign > 0 else relax.op.subtract)(d, sh), f"{name}_d2_g{g}")
        acc = d if acc is None else emit(relax.op.add(acc, d), f"{name}_acc_g{g}")
    return acc


def emit_layer(emit: Emit, layer: Any, inputs: list[relax.Expr], cfg: NPUConfig) -> relax.Expr:
    """The integer form of ``layer`` (a ``target_npu.layer.Layer``) on ``inputs``; returns its output
    expression (not yet bound: the caller binds it to the layer's output variable)."""
    s, n = layer.spec, layer.name
    if isinstance(s, (ConvSpec, LinearSpec)):
        xs = _operand(emit, inputs[0], s.x_zp, n, 0)
        lin = isinstance(s, LinearSpec)
        if lin and len(layer.in_shape) != 2:
            xs = emit(relax.op.reshape(xs, (layer.in_shape[0], s.c)), f"{n}_flat")
        acc = _mac(emit, xs, s, n, cfg, lin)
        return _tail(emit, _norm(emit, acc, s.m, s.b, len(layer.out_shape), n), s, n)
    if isinstance(s, AddSpec):
        terms = []
        for k, (x, zp, m) in enumerate(((inputs[0], s.a_zp, s.ma), (inputs[1], s.b_zp, s.mb))):
            f = emit(relax.op.astype(_operand(emit, x, zp, n, k), "float32"), f"{n}_f{k}")
            terms.append(emit(relax.op.multiply(f, _per_channel(m, 4)), f"{n}_mul{k}"))
        t = emit(relax.op.add(emit(relax.op.add(*terms), f"{n}_sum"), _per_channel(s.bias, 4)), f"{n}_norm")
        return _tail(emit, t, s, n)
    if isinstance(s, PoolSpec) and s.kind == "max":
        mp = emit(relax.op.nn.max_pool2d(inputs[0], list(s.kernel), list(s.stride), list(s.pads)), f"{n}_in0")
        return _tail(emit, mp, s, n, rounded=False)
    if isinstance(s, PoolSpec) and s.kind in ("global_avg", "avg"):
        xi = emit(relax.op.astype(inputs[0], "int32"), f"{n}_in0")
        xs = emit(relax.op.subtract(xi, _const(s.x_zp, "int32")), f"{n}_xs0")
        ndim = len(layer.out_shape)
        if s.kind == "global_avg":  # (N, C, 1, 1), or (N, C) for a ReduceMean with keepdims=0
            acc = emit(relax.op.sum(xs, axis=[2, 3], keepdims=ndim == 4), f"{n}_acc")
        else:  # the exact int32 window sum: a depthwise conv with an all-ones kernel
            ones = np.ones((s.c, 1, *s.kernel), np.int32)
            acc = emit(relax.op.nn.conv2d(xs, _const(ones, "int32"), strides=list(s.stride), groups=s.c,
                                          out_dtype="int32"), f"{n}_acc")
        return _tail(emit, _norm(emit, acc, s.m, s.b, ndim, n), s, n)
    raise ValueError(f"layer {n}: no integer form for a {type(s).__name__}")


# --------------------------------------------------------------------------------- patterns
def _operand_pat(dtype: str = "int16") -> DFPattern:
    """``x - zp`` in ``dtype``: int16 for the MAC layers and the add, int32 for the average pools."""
    return is_op("relax.subtract")(is_op("relax.astype")(wildcard()).has_dtype(dtype), is_const())


def _tail_pat(t: DFPattern, rounded: bool = True) -> DFPattern:
    r = is_op("relax.round")(t) if rounded else t
    return is_op("relax.astype")(is_op("relax.clip")(r, wildcard(), wildcard()))


def _norm_pat(acc: DFPattern) -> DFPattern:
    return is_op("relax.add")(is_op("relax.multiply")(is_op("relax.astype")(acc), is_const()), is_const())


def _term_pat(rel: str, src: DFPattern) -> DFPattern:
    d = is_op(rel)(src, is_const())
    sh = is_op("relax.right_shift")(d, is_const())
    return d | is_op("relax.add")(d, sh) | is_op("relax.subtract")(d, sh)


def mac_patterns(op: str, cfg: NPUConfig) -> list[DFPattern]:
    """Patterns of a conv2d (``op="conv2d"``) or linear (``"matmul"``) layer, one per number of ISG
    groups present (most groups first)."""
    out = []
    for reshaped in ((False, True) if op == "matmul" else (False,)):
        for terms in range(cfg.num_groups, 0, -1):
            xs = _operand_pat()
            src = is_op("relax.reshape")(xs, wildcard()) if reshaped else xs
            rel = "relax.nn.conv2d" if op == "conv2d" else "relax.matmul"
            acc = _term_pat(rel, src)
            for _ in range(terms - 1):
                acc = is_op("relax.add")(acc, _term_pat(rel, src))
            out.append(_tail_pat(_norm_pat(acc)))
    return out


def patterns(kind: str, cfg: NPUConfig) -> list[DFPattern]:
    """The patterns of one NPU layer kind: ``conv2d``, ``linear``, ``add``, ``max_pool2d``, ``global_avg_pool``,
    ``avg_pool2d``."""
    if kind in ("conv2d", "linear"):
        return mac_patterns("conv2d" if kind == "conv2d" else "matmul", cfg)
    if kind == "add":
        def term() -> DFPattern:
            return is_op("relax.multiply")(is_op("relax.astype")(_operand_pat()), is_const())
        return [_tail_pat(is_op("relax.add")(is_op("relax.add")(term(), term()), is_const()))]
    if kind == "max_pool2d":
        return [_tail_pat(is_op("relax.nn.max_pool2d")(wildcard()), rounded=False)]
    if kind == "global_avg_pool":
        return [_tail_pat(_norm_pat(is_op("relax.sum")(_operand_pat("int32"))))]
    if kind == "avg_pool2d":
        return [_tail_pat(_norm_pat(is_op("relax.nn.conv2d")(_operand_pat("int32"), is_const())))]
    raise ValueError(f"no NPU pattern for {kind!r}")


# ------------------------------------------------------------------------ reading the names
def bindings_of(func: relax.Function) -> dict[str, Any]:
    """Binding name -> bound value of ``func``'s dataflow (the integer forms are found by these names)."""
    return {b.var.name: b.value for blk in func.body.blocks for b in blk.bindings}


def layer_name_of(func: relax.Function) -> str:
    """Name of the layer a composite function holds (from its ``<name>_clip`` binding); ValueError if none."""
    names = [n.removesuffix("_clip") for n in bindings_of(func) if n.endswith("_clip")]
    if len(names) != 1:
        raise ValueError(f"composite function holds {len(names)} integer layers (bindings {list(bindings_of(func))})")
    return names[0]


def operands_of(bindings: dict[str, Any], name: str, count: int) -> list[relax.Expr]:
    """The ``count`` operands of layer ``name``: the first argument of each ``<name>_in<k>`` binding."""
    out = []
    for k in range(count):
        v = bindings.get(f"{name}_in{k}")
        if not isinstance(v, relax.Call):
            raise ValueError(f"layer {name}: no binding {name}_in{k} (its integer form was changed by a pass)")
        out.append(v.args[0])
    return out


# ------------------------------------------------------------------------- rewriting layers
Make = Callable[[int, Any, list[relax.Expr], Emit], relax.Expr]
"""``make(index, layer, operands, emit)`` -> the new value of the layer's output variable."""


def rewrite_layers(mod: tvm.IRModule, layers: list[Any], make: Make, which: set[int]) -> tvm.IRModule:
    """``mod`` with the value of each layer ``i in which`` (the binding of ``layers[i].out_name`` in
    ``main``) replaced by ``make(i, layer, operands, emit)``; the ops it made dead are removed.

    Operands: the first arguments of the layer's ``<name>_in<k>`` bindings when it is in integer form,
    else ``layer.inputs`` (the integer tensors ``FoldQDQ`` found under the QDQ chain)."""
    func = mod["main"]
    bindings = bindings_of(func)
    by_var = {layers[i].out_name: i for i in which}
    if len(by_var) != len(which):
        raise ValueError("two layers bind the same output variable")

    @mutator
    class Rewrite(PyExprMutator):
        def visit_var_binding_(self, binding: relax.VarBinding) -> None:  # noqa: D102
            i = by_var.get(binding.var.name)
            if i is None:
                return super().visit_var_binding_(binding)
            ly = layers[i]
            ops = operands_of(bindings, ly.name, len(ly.in_dtypes)) if f"{ly.name}_in0" in bindings \
                else list(ly.inputs)
            value = make(i, ly, [self.visit_expr(o) for o in ops], lambda e, n: self.builder_.emit(e, n))
            # the new value has the output's shape and dtype, so the output variable (and its readers) stay
            self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(value)))

    m = Rewrite(mod)
    new_main = m.visit_expr(func)
    out = m.builder_.get()
    out["main"] = new_main
    return relax.transform.DeadCodeElimination()(out)
