"""The folded integer form (target_npu.integer_ops): it computes the contract, and the pattern table
matches it (and only it)."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.transform import FusionPattern

from hw_model.config import NPUConfig
from hw_model.layer_specs import AddSpec, ConvSpec, LinearSpec, PoolSpec
from target_npu.integer_ops import emit_layer, layer_name_of, operands_of, patterns
from target_npu.layer import Layer
from target_npu.patterns import KINDS
from target_npu.runtime import execute

CFG = NPUConfig()


def _random_layer(rng: np.random.Generator, kind: str) -> Layer:
    n, c, h = int(rng.integers(1, 3)), int(rng.integers(1, 40)), int(rng.integers(2, 8))
    dt = str(rng.choice(["int8", "uint8"]))
    out_dt = str(rng.choice(["int8", "uint8"]))
    info = np.iinfo(out_dt)
    lo = int(rng.integers(info.min, info.min + 20))
    hi = int(rng.integers(info.max - 20, info.max + 1))
    zp = int(rng.integers(np.iinfo(dt).min, np.iinfo(dt).max + 1)) // 8
    if kind in ("conv", "dw", "linear", "linear4d"):
        k = c if kind == "dw" else int(rng.integers(1, 40))
        gvec = rng.integers(0, CFG.num_groups, size=c * (h * h if kind == "linear4d" else 1))
        m = (rng.random(k) * 0.05).astype(np.float32)
        b = (rng.standard_normal(k) * 20).astype(np.float32)
        if kind.startswith("linear"):
            cin = gvec.size
            w = rng.integers(-128, 128, size=(k, cin)).astype(np.int8)
            spec = LinearSpec(n, cin, k, w, m, b, lo, hi, x_zp=zp, in_dtype=dt, out_dtype=out_dt, isg_groups=gvec)
            ins = (n, c, h, h) if kind == "linear4d" else (n, c)
            return Layer("conv", "linear5", spec, [ins], [dt], (n, k), out_dt)
        kh = int(rng.choice([1, 3]))
        stride = int(rng.integers(1, 3))
        w = rng.integers(-128, 128, size=(k, 1 if kind == "dw" else c, kh, kh)).astype(np.int8)
        spec = ConvSpec(n, c, h, h, k, w, m, b, lo, hi, stride=(stride, stride), pads=(kh // 2,) * 4,
                        groups=c if kind == "dw" else 1, x_zp=zp, in_dtype=dt, out_dtype=out_dt, isg_groups=gvec)
        oh = (h + 2 * (kh // 2) - kh) // stride + 1
        return Layer("conv", "conv3", spec, [(n, c, h, h)], [dt], (n, k, oh, oh), out_dt)
    if kind == "add":
        dt2 = str(rng.choice(["int8", "uint8"]))
        ma, mb = (np.float32(rng.random() * 2) for _ in range(2))
        spec = AddSpec(n, c, h, h, zp, int(rng.integers(-3, 3)), ma, mb, np.float32(rng.integers(-5, 5)), lo, hi,
                       a_dtype=dt, b_dtype=dt2, out_dtype=out_dt)
        return Layer("add", "add7", spec, [(n, c, h, h)] * 2, [dt, dt2], (n, c, h, h), out_dt)
    if kind == "maxpool":
        info = np.iinfo(dt)
        spec = PoolSpec("max", n, c, h, h, kernel=(2, 2), stride=(2, 2), pads=(0, 0, 1, 1),
                        lo=int(info.min) + 3, hi=int(info.max) - 3, in_dtype=dt, out_dtype=dt)
        return Layer("maxpool", "maxpool2", spec, [(n, c, h, h)], [dt], (n, c, h // 2 + 1, h // 2 + 1) if h % 2
                     else (n, c, h // 2, h // 2), dt)
    if kind == "avgpool":
        k = int(rng.integers(1, min(h, 3) + 1))
        st = int(rng.integers(1, k + 1))
        spec = PoolSpec("avg", n, c, h, h, kernel=(k, k), stride=(st, st), x_zp=zp, m=float(rng.random() / (k * k)),
                        b=float(rng.integers(-3, 3)), lo=lo, hi=hi, in_dtype=dt, out_dtype=out_dt)
        oh = (h - k) // st + 1
        return Layer("gap", "avgpool4", spec, [(n, c, h, h)], [dt], (n, c, oh, oh), out_dt)
    spec = PoolSpec("global_avg", n, c, h, h, x_zp=zp, m=float(rng.random() / (h * h)),
                    b=float(rng.integers(-3, 3)), lo=lo, hi=hi, in_dtype=dt, out_dtype=out_dt)
    out = (n, c) if kind == "gap2d" else (n, c, 1, 1)  # gap2d: a ReduceMean with keepdims=0
    return Layer("gap", "gap9", spec, [(n, c, h, h)], [dt], out, out_dt)


def _module(ly: Layer) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    xs = [relax.Var(f"x{k}", relax.TensorType(s, d)) for k, (s, d) in enumerate(zip(ly.in_shapes, ly.in_dtypes))]
    with bb.function("main", xs):
        with bb.dataflow():
            y = bb.emit_output(emit_layer(lambda e, name: bb.emit(e, name), ly, xs, CFG))
        bb.emit_func_output(y)
    return bb.get()


KINDS_TESTED = ["conv", "dw", "linear", "linear4d", "add", "maxpool", "gap", "gap2d", "avgpool"]


@pytest.mark.parametrize("kind", KINDS_TESTED)
def test_integer_form_run_by_llvm_equals_the_contract(kind):
    """The printed integer form is not a stub: compiled for the CPU it gives the contract's integers."""
    for seed in range(4):
        rng = np.random.default_rng(seed)
        ly = _random_layer(rng, kind)
        vm = relax.VirtualMachine(tvm.compile(_module(ly), target="llvm"), tvm.cpu())
        xs = [rng.integers(np.iinfo(d).min, np.iinfo(d).max + 1, size=s).astype(d)
              for s, d in zip(ly.in_shapes, ly.in_dtypes)]
        got = vm["main"](*(tvm.runtime.tensor(x) for x in xs)).numpy()
        want = execute(ly, xs, CFG)
        assert got.dtype == want.dtype and np.array_equal(got, want), (kind, seed)


def test_each_form_is_matched_by_its_own_pattern_only():
    """Every kind's emitted ops are matched whole by exactly the pattern of its kind."""
    rng = np.random.default_rng(0)
    for kind, want in [("conv", "conv2d"), ("dw", "conv2d"), ("linear", "linear"), ("linear4d", "linear"),
                       ("add", "add"), ("maxpool", "max_pool2d"), ("gap", "global_avg_pool"),
                       ("gap2d", "global_avg_pool"), ("avgpool", "avg_pool2d")]:
        ly = _random_layer(rng, kind)
        table = [FusionPattern(f"ioso_npu.{name}", p) for name in KINDS for p in patterns(name, CFG)]
        mod = relax.transform.FuseOpsByPattern(table, bind_constants=True, annotate_codegen=False)(_module(ly))
        comps = {gv.name_hint: f for gv, f in mod.functions.items() if gv.name_hint != "main"}
        assert [f.attrs["Composite"] for f in comps.values()] == [f"ioso_npu.{want}"], kind
        func = next(iter(comps.values()))
        assert layer_name_of(func) == ly.name
        bindings = {b.var.name: b.value for blk in func.body.blocks for b in blk.bindings}
        assert [o.same_as(p) for o, p in zip(operands_of(bindings, ly.name, len(ly.in_dtypes)), func.params)] \
            == [True] * len(ly.in_dtypes)


def test_a_changed_form_is_not_matched():
    """A rounding the NPU does not have (floor instead of round-half-even) matches no pattern."""
    ly = _random_layer(np.random.default_rng(1), "conv")
    mod = _module(ly)

    @relax.expr_functor.mutator
    class Floor(relax.expr_functor.PyExprMutator):
        def visit_call_(self, call):  # noqa: D102
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.round":
                return relax.op.floor(call.args[0])
            return call

    m = Floor(mod)
    mod["main"] = m.visit_expr(mod["main"])
    table = [FusionPattern(f"ioso_npu.{name}", p) for name in KINDS for p in patterns(name, CFG)]
    out = relax.transform.FuseOpsByPattern(table, bind_constants=True, annotate_codegen=False)(mod)
    assert [gv.name_hint for gv in out.get_global_vars()] == ["main"]
