"""The NPU pass pipeline (target_npu.transform.pipeline): printable, same result as the hand-called passes,
extensible with user passes, order checked, planner switchable."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx
import pytest
import tvm
import tvm_ffi
from tvm import relax

import ioso_tvm
from hw_model.config import DEFAULT_CONFIG as CFG
from ioso_tvm.frontend import import_onnx
from ioso_tvm.testing import QDQBuilder
from target_npu import runtime
from target_npu.integer_ops import emit_layer, rewrite_layers
from target_npu.partition import layers_to_cpu, partition
from target_npu.patterns import PartitionContext
from target_npu.transform.fold_qdq import find_layers, fold_qdq
from target_npu.transform.permute_groups import Plan, apply_plan, external_tensors, is_contiguous, plan_permutations
from target_npu.transform.pipeline import (
    FoldQDQ,
    NPUCompileState,
    PartitionForNPU,
    PlanGroupPermutation,
    npu_pipeline,
    pass_names,
)

NAMES = ["ioso_npu.FoldQDQ", "ioso_npu.PlanGroupPermutation", "ioso_npu.PartitionForNPU"]
PREFIX = "ioso_npu.mpipetest"


def _resnet_like(seed: int, c: int = 32, dilate_last: bool = False) -> tuple[QDQBuilder, onnx.ModelProto, object]:
    """Stem, max pool, two residual blocks (fan-out), strided conv, GAP, linear; random ISG groups."""
    b = QDQBuilder((1, 3, 8, 8), np.random.default_rng(seed))
    x = b.maxpool(b.conv(b.input, c, isg=False))
    for _ in range(2):
        y = b.conv(b.conv(x, c), c, act=None, signed_out=True)
        x = b.add(x, y)
    out = b.linear(b.gap(b.conv(x, 2 * c, stride=2)), 10)
    m = b.model([out])
    if dilate_last:  # the strided conv stays a float QDQ chain on the CPU (fold_qdq fallback)
        conv = [n for n in m.graph.node if n.op_type == "Conv"][-1]
        conv.attribute.append(onnx.helper.make_attribute("dilations", [2, 2]))
    return b, m, out


def _import(model: onnx.ModelProto) -> tuple[tvm.IRModule, dict]:
    mod, meta = import_onnx(model, CFG)
    return mod, {"*": max([v.get("wbits", 8) for v in meta.get("layers", {}).values()], default=8)}


def _state(wbits: dict, **kw) -> NPUCompileState:
    return NPUCompileState(CFG, PREFIX, {"input"}, wbits, **kw)


def _hand_sequence(mod: tvm.IRModule, wbits: dict, offload: bool = True):
    """compile()'s ioso_npu branch as it calls the passes by hand today."""
    layers, fallbacks = find_layers(mod, CFG, wbits)
    mod = fold_qdq(mod, layers, PREFIX, CFG)
    plan = plan_permutations(layers, external_tensors(mod, layers), {"input"}, CFG)
    assert not plan.granularity_violations
    old, (layers, permutes) = layers, (apply_plan(layers, plan), plan.counts())
    changed = {i for i, (a, b) in enumerate(zip(old, layers)) if a.spec is not b.spec}
    mod = rewrite_layers(mod, layers, lambda i, ly, ops, emit: emit_layer(emit, ly, ops, CFG), changed)
    ctx = PartitionContext(layers, CFG, [None] * len(layers), profile=runtime.Profile())
    if offload:
        mod = partition(mod, ctx, PREFIX)
    else:
        ctx.rejected.update({i: "offload=False" for i, ly in enumerate(layers) if ly.kind != "input"})
        mod = layers_to_cpu(mod, layers, PREFIX, set(ctx.rejected))
    return mod, layers, fallbacks, plan, permutes, ctx


def _same_layers(a: list, b: list) -> None:
    assert [(x.kind, x.name, x.out_name, x.out_shape, x.out_dtype) for x in a] == \
        [(y.kind, y.name, y.out_name, y.out_shape, y.out_dtype) for y in b]
    for x, y in zip(a, b):
        assert type(x.spec) is type(y.spec)
        for f in dataclasses.fields(x.spec):
            assert np.array_equal(np.asarray(getattr(x.spec, f.name)), np.asarray(getattr(y.spec, f.name))), \
                (x.name, f.name)


def _packed_calls(mod: tvm.IRModule) -> list[str]:
    out: list[str] = []

    def visit(e) -> None:
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_dps_packed":
            out.append(str(e.args[0].global_symbol))

    relax.analysis.post_order_visit(mod["main"], visit)
    return out


def test_pipeline_prints_the_three_passes_in_order():
    seq = npu_pipeline(_state({"*": 8}))
    assert isinstance(seq, tvm.transform.Sequential)
    assert seq.info.name == "ioso_npu.pipeline"
    assert [p.info.name for p in seq.passes] == NAMES
    text = str(seq)
    pos = [text.index(f'name="{n}"') for n in NAMES]
    assert pos == sorted(pos) and text.index('name="ioso_npu.pipeline"') < pos[0]
    assert pass_names(tvm.transform.Sequential([seq, seq.passes[0]])) == [*NAMES, NAMES[0]]


@pytest.mark.parametrize("seed,dilate,offload", [(0, False, True), (1, False, True), (2, True, True),
                                                 (3, False, False)])
def test_pipeline_equals_the_hand_called_passes(seed, dilate, offload):
    _, model, _ = _resnet_like(seed, dilate_last=dilate)
    mod, wbits = _import(model)
    want, layers, fallbacks, plan, permutes, ctx = _hand_sequence(mod, wbits, offload)
    state = _state(wbits, offload=offload)
    got = npu_pipeline(state)(_import(model)[0])
    tvm.ir.assert_structural_equal(got, want)  # TVM 0.27: tvm.ir.structural_equal is tvm_ffi.structural_equal
    assert tvm_ffi.structural_equal(got, want) and not tvm_ffi.structural_equal(got, mod)
    assert state.ran == NAMES
    _same_layers(state.layers, layers)
    assert state.fallbacks == fallbacks and (len(fallbacks) == 1) == dilate
    assert state.permutes == permutes and permutes["permuted_tensors"] > 0
    assert {k: v.tolist() for k, v in state.plan.perms.items()} == {k: v.tolist() for k, v in plan.perms.items()}
    assert state.ctx.rejected == ctx.rejected and state.ctx.regions == ctx.regions
    assert state.ctx.symbols == ctx.symbols
    assert len(state.ctx.regions) == (0 if not offload else 2 if dilate else 1)
    if not offload:
        assert set(state.ctx.rejected) == {i for i, ly in enumerate(layers) if ly.kind != "input"}


def _counter(seen: dict, state: NPUCompileState) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="user.CountNPUCalls")
    def count(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        calls = _packed_calls(mod)
        seen["ran"] = list(state.ran)
        seen["npu"] = [c for c in calls if c.startswith(f"{PREFIX}.npu.r")]
        seen["cpu"] = [c for c in calls if c.startswith(PREFIX + ".") and not c.startswith(f"{PREFIX}.npu.")]
        return mod

    return count


@pytest.mark.parametrize("how", ["nested", "flat"])
def test_user_pass_after_the_pipeline_sees_the_partitioned_module(how):
    _, model, _ = _resnet_like(4, dilate_last=True)
    mod, wbits = _import(model)
    state, seen = _state(wbits), {}
    pipe = npu_pipeline(state)
    seq = tvm.transform.Sequential([pipe, _counter(seen, state)] if how == "nested"
                                   else [*pipe.passes, _counter(seen, state)], name="user.pipeline")
    assert pass_names(seq) == [*NAMES, "user.CountNPUCalls"]
    out = seq(mod)
    assert seen["ran"] == NAMES  # ran after all three
    assert sorted(seen["npu"]) == sorted(r.symbol for r in state.ctx.regions) and len(seen["npu"]) == 2  # split
    assert seen["cpu"] == [f"{PREFIX}.0"]  # the input quantizer
    assert _packed_calls(out).count(seen["npu"][0]) == 1


def _ops(mod: tvm.IRModule) -> dict[str, str]:
    """Var name -> op name of each op call in main."""
    return {b.var.name: b.value.op.name for blk in mod["main"].body.blocks for b in blk.bindings
            if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)}


def test_user_pass_between_fold_and_partition_sees_the_integer_ops():
    _, model, _ = _resnet_like(5)
    mod, wbits = _import(model)
    state, seen = _state(wbits), {}
    fold, plan, part = npu_pipeline(state).passes
    after_fold = {}

    @tvm.transform.module_pass(opt_level=0, name="user.Look")
    def look(m: tvm.IRModule, _ctx) -> tvm.IRModule:
        after_fold["ops"] = _ops(m)
        return m

    tvm.transform.Sequential([fold, _counter(seen, state), look, plan, part])(mod)
    assert seen["ran"] == NAMES[:1]
    assert seen["npu"] == [] and seen["cpu"] == [f"{PREFIX}.0"]  # only the input quantizer is a CPU call
    ops = after_fold["ops"]
    assert "relax.quantize" not in ops.values()  # (the model's float output is still a dequantize)
    assert list(ops.values()).count("relax.dequantize") == 1
    for ly in state.layers[1:]:  # every layer's output is its integer form's cast, its operands int16
        assert ops[ly.out_name] == "relax.astype" and ops[f"{ly.name}_clip"] == "relax.clip"
        if ly.kind == "conv":
            assert ops[f"{ly.name}_in0"] == "relax.astype" and ops[f"{ly.name}_xs0"] == "relax.subtract"
            assert any(ops.get(f"{ly.name}_d1_g{g}") in ("relax.nn.conv2d", "relax.matmul") for g in range(3))
    assert state.ran == NAMES and len(state.ctx.regions) == 1


@pytest.mark.parametrize("order", [o for o in itertools.permutations(range(3)) if o != (0, 1, 2)])
def test_wrong_order_is_a_clear_error(order):
    _, model, _ = _resnet_like(6)
    mod, wbits = _import(model)
    state = _state(wbits)
    passes = [(FoldQDQ, PlanGroupPermutation, PartitionForNPU)[i](state) for i in order]
    msg = "run ioso_npu.FoldQDQ first" if order[0] != 0 else "must run before ioso_npu.PartitionForNPU"
    with pytest.raises(ValueError, match=msg):
        tvm.transform.Sequential(passes)(mod)


def test_a_state_runs_once_and_checks_granularity():
    _, model, _ = _resnet_like(7)
    mod, wbits = _import(model)
    state = _state(wbits)
    pipe = npu_pipeline(state)
    pipe(mod)
    with pytest.raises(ValueError, match="ioso_npu.FoldQDQ already ran"):
        pipe(mod)
    with pytest.raises(ValueError, match="ioso_npu.PartitionForNPU already ran"):
        PartitionForNPU(state)(mod)
    b = QDQBuilder((1, 16, 4, 4), np.random.default_rng(12))
    y = b.conv(b.input, 16, group_vec=np.array([0] * 8 + [1] * 8))  # two remainder groups
    mod, wbits = _import(b.model([y]))
    state = _state(wbits)
    with pytest.raises(ValueError, match="granularity"):
        npu_pipeline(state)(mod)
    assert state.ran == NAMES[:1]


def test_tilings_of_gets_the_permuted_layers():
    _, model, _ = _resnet_like(8)
    mod, wbits = _import(model)
    got: list = []
    state = _state(wbits, tilings_of=lambda layers: got.append(layers) or [None] * len(layers))
    npu_pipeline(state)(mod)
    assert len(got) == 1 and got[0] is state.layers and state.ctx.tilings == [None] * len(state.layers)
    bad = _state(wbits, tilings_of=lambda layers: [None])
    with pytest.raises(ValueError, match="tilings_of gave 1 tilings"):
        npu_pipeline(bad)(_import(model)[0])


def _npu_layers(state: NPUCompileState) -> list[int]:
    return sorted(state.ctx.symbols)


def _wants_a_permutation(layers: list) -> int:
    return sum(ly.kind == "conv" and not ly.is_linear and ly.spec.groups == 1 and not is_contiguous(ly.isg_groups, CFG)
               for ly in layers)


@pytest.mark.parametrize("seed", range(3))
def test_permute_false_permutes_nothing(seed):
    _, model, _ = _resnet_like(seed)
    on, off = _state(_import(model)[1]), _state(_import(model)[1], permute=False)
    npu_pipeline(on)(_import(model)[0])
    npu_pipeline(off)(_import(model)[0])
    folded, _ = find_layers(_import(model)[0], CFG, off.wbits)
    assert _wants_a_permutation(folded) > 0  # the model has non-contiguous ISG groups
    assert on.plan.perms and on.permutes["permuted_tensors"] > 0
    assert off.plan.perms == {} and off.permutes == Plan().counts()  # the planner is off: empty Plan()
    _same_layers(off.layers, folded)  # constants untouched
    assert _wants_a_permutation(off.layers) > on.permutes["gathered_loads"]
    assert _npu_layers(off) == _npu_layers(on)  # the same layers offloaded either way


@pytest.mark.parametrize("seed,dilate", [(11, False), (12, True)])
def test_pipeline_agrees_with_compile(seed, dilate):
    """Same layers (constants after permutation), fallbacks, permutation counts and NPU layers as compile()."""
    _, model, _ = _resnet_like(seed, dilate_last=dilate)
    mod, wbits = _import(model)
    state = _state(wbits)
    npu_pipeline(state)(mod)
    cm = ioso_tvm.compile(model)
    _same_layers(state.layers, cm.layers)
    assert state.fallbacks == cm.fallbacks and state.permutes == cm.permutes
    assert sorted(state.ctx.rejected.items()) == sorted(cm.cpu_reasons.items())
    assert [r.steps for r in state.ctx.regions] == [r.steps for r in cm.regions]
    assert sorted(state.ctx.symbols) == [i for i, on in enumerate(cm.npu) if on]
