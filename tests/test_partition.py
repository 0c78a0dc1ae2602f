"""BYOC partition: pattern checks decide NPU vs CPU per layer; both paths equal hw_model.reference."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import tvm
from tvm import relax

import ioso_tvm
from hw_model.config import NPUConfig
from hw_model.layer_specs import ConvSpec
from ioso_tvm.testing import QDQBuilder
from target_npu.layer import Layer
from target_npu.patterns import KINDS, npu_limits
from target_npu.runtime import to_spec

TINY = NPUConfig(scratchpad_kib=1, weight_buf_kib=1, acc_buf_kib=1)


def _packed_names(mod: tvm.IRModule) -> list[str]:
    names: list[str] = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_dps_packed":
            names.append(str(e.args[0].global_symbol))

    relax.analysis.post_order_visit(mod["main"], visit)
    return names


def _two_convs(rng, c2: int):
    """A small conv (fits anything) then a wide one (needs more than TINY's buffers)."""
    b = QDQBuilder((1, 16, 6, 6), rng)
    x = b.conv(b.input, 16, kernel=1, pad=0)
    y = b.conv(x, c2, kernel=3)
    return b, y


@pytest.mark.parametrize("seed", range(4))
def test_rejected_layer_stays_on_cpu_and_result_is_exact(caplog, seed):
    rng = np.random.default_rng(seed)
    b, y = _two_convs(rng, 64)
    caplog.set_level(logging.INFO)
    cm = ioso_tvm.compile(b.model([y]), config=TINY)
    rep = cm.report()
    dev = {r["name"]: r["device"] for r in rep["layers"]}
    assert dev["conv1"] == "npu" and dev["conv2"] == "cpu"
    low = {r["name"]: r["lowering"] for r in rep["layers"]}
    assert low["conv1"] == "tir" and low["conv2"] is None
    fb = [f for f in rep["fallbacks"] if f["op"] == "conv2"]
    assert len(fb) == 1 and "fits the on-chip memories" in fb[0]["reason"]
    assert any("conv2" in r.getMessage() and "fits" in r.getMessage() for r in caplog.records)
    x = rng.standard_normal(b.shape).astype(np.float32)
    assert np.array_equal(cm.run(x), b.run_reference(x, [y])[0])


def test_offloaded_calls_use_codegen_symbols():
    rng = np.random.default_rng(1)
    b, y = _two_convs(rng, 64)
    cm = ioso_tvm.compile(b.model([y]), config=TINY)
    from target_npu.partition import partition  # noqa: F401  (codegen registered on import)

    assert len(cm.streams) == 1 and tvm.get_global_func(cm.streams[0].meta["symbol"]) is not None
    assert cm.npu == [False, True, False]
    ref = ioso_tvm.compile(b.model([y]), config=TINY, offload=False)
    assert ref.npu == [False, False, False]
    x = rng.standard_normal(b.shape).astype(np.float32)
    assert np.array_equal(cm.run(x), ref.run(x))


def test_partitioned_module_calls_npu_and_cpu_functions():
    from hw_model.config import NPUConfig as Cfg
    from ioso_tvm.frontend import import_onnx
    from target_npu import runtime
    from target_npu.partition import partition
    from target_npu.patterns import PartitionContext
    from target_npu.transform.fold_qdq import find_layers, fold_qdq

    rng = np.random.default_rng(2)
    b, y = _two_convs(rng, 64)
    mod, _ = import_onnx(b.model([y]), Cfg(), None)
    layers, _ = find_layers(mod, TINY)
    mod = fold_qdq(mod, layers, "ioso_npu.tpart", TINY)
    ctx = PartitionContext(layers, TINY, [None] * len(layers), profile=runtime.Profile())
    out = partition(mod, ctx, "ioso_npu.tpart")
    names = _packed_names(out)
    assert names.count("ioso_npu.tpart.npu.r0") == 1  # layer 1's NPU region
    assert "ioso_npu.tpart.2" in names and "ioso_npu.tpart.1" not in names
    assert set(ctx.rejected) == {2} and set(ctx.symbols) == {1}  # 0: the input quantizer, matched by no pattern
    assert [r.layers for r in ctx.regions] == [[1]]
    assert "ioso_npu_layer" not in [gv.name_hint for gv in out.get_global_vars()]  # the stub is gone


def _layer(**over) -> Layer:
    spec = ConvSpec(1, 16, 8, 8, 16, np.ones((16, 16, 3, 3), np.int8), np.ones(16, np.float32),
                    np.zeros(16, np.float32), pads=(1, 1, 1, 1), isg_groups=np.zeros(16, np.int64))
    spec = dataclasses.replace(spec, **over)
    return Layer("conv", "convX", spec, [(1, 16, 8, 8)], [spec.in_dtype], (1, 16, 8, 8), spec.out_dtype)


@pytest.mark.parametrize("layer, words", [
    (_layer(in_dtype="int16"), "int16"),
    (_layer(out_dtype="int32"), "output dtype"),
    (_layer(lo=5, hi=4), "clip"),
    (_layer(weight=np.ones((16, 16, 9, 9), np.int8)), "kernel"),
    (_layer(stride=(5, 5)), "stride"),
    (_layer(groups=3), "groups"),
])
def test_limits_name_the_violation(layer, words):
    why = npu_limits(to_spec(layer))
    assert why is not None and words in why


def test_limits_accept_a_plain_conv():
    assert npu_limits(to_spec(_layer())) is None
    assert set(KINDS.values()) == {"conv", "add", "maxpool", "gap"}


def test_export_load_keeps_the_partition(tmp_path):
    rng = np.random.default_rng(11)
    b, y = _two_convs(rng, 64)
    cm = ioso_tvm.compile(b.model([y]), config=TINY)
    cm2 = ioso_tvm.load(cm.export(tmp_path / "m.tar"))
    assert cm2.npu == cm.npu and cm2.cpu_reasons == cm.cpu_reasons
    assert [f["op"] for f in cm2.report()["fallbacks"]] == ["conv2"]
    x = rng.standard_normal(b.shape).astype(np.float32)
    assert np.array_equal(cm2.run(x), b.run_reference(x, [y])[0])


@pytest.mark.parametrize("seed", [0, 1])
def test_neighbouring_npu_layers_merge_into_one_region(seed):
    """MergeCompositeFunctions: conv -> (conv, add with fan-out) -> gap is one NPU region, called once."""
    rng = np.random.default_rng(seed)
    b = QDQBuilder((2, 16, 6, 6), rng)
    x = b.conv(b.input, 16)
    out = b.gap(b.add(x, b.conv(x, 16, act=None, signed_out=True)))
    cm = ioso_tvm.compile(b.model([out]), input_shapes={"input": [2, 16, 6, 6]})
    assert len(cm.regions) == 1 and cm.regions[0].layers == [1, 2, 3, 4]
    add = cm.regions[0].steps[2]
    assert add.inputs == ("step:0", "step:1")  # the add reads both branches inside the region
    xx = rng.standard_normal((2, 16, 6, 6)).astype(np.float32)
    assert np.array_equal(cm.run({"input": xx}, mode="both"), b.run_reference(xx, [out])[0])
    assert all(cm.profile.calls[ly.name] == 1 for ly in cm.layers)
    assert all(cm.profile.cycles[ly.name] > 0 for ly in cm.layers[1:])


def test_a_cpu_layer_splits_the_npu_regions():
    from hw_model.config import NPUConfig as Cfg
    from ioso_tvm.frontend import import_onnx
    from target_npu import runtime
    from target_npu.partition import partition
    from target_npu.patterns import PartitionContext
    from target_npu.transform.fold_qdq import find_layers, fold_qdq

    rng = np.random.default_rng(3)
    b = QDQBuilder((1, 16, 6, 6), rng)
    x = b.conv(b.input, 16, kernel=1, pad=0)
    y = b.conv(b.conv(x, 64, kernel=3), 16, kernel=1, pad=0)  # the 3x3 64-channel conv does not fit TINY
    mod, _ = import_onnx(b.model([y]), Cfg(), None)
    layers, _ = find_layers(mod, TINY)
    mod = fold_qdq(mod, layers, "ioso_npu.tsplit", TINY)
    ctx = PartitionContext(layers, TINY, [None] * len(layers), profile=runtime.Profile())
    out = partition(mod, ctx, "ioso_npu.tsplit")
    assert set(ctx.rejected) == {2}
    assert sorted(r.layers for r in ctx.regions) == [[1], [3]]
    names = _packed_names(out)
    assert "ioso_npu.tsplit.2" in names and sum(n.startswith("ioso_npu.tsplit.npu.r") for n in names) == 2


def test_region_records_round_trip_and_refuse_dangling_refs():
    from target_npu.regions import Region, Step

    r = Region("ioso_npu.mX.npu.r0", 2, (Step(3, ("in:0", "in:1")), Step(4, ("step:0",))), ("step:1", "step:0"))
    assert Region.from_dict(r.to_dict()) == r and r.layers == [3, 4]
    for bad in ({**r.to_dict(), "outputs": ["step:2"]},
                {**r.to_dict(), "steps": [{"layer": 3, "inputs": ["in:2"]}]},
                {**r.to_dict(), "steps": [{"layer": 3, "inputs": ["step:0"]}]},
                {**r.to_dict(), "steps": [{"layer": 3, "inputs": ["x:0"]}]},
                {"symbol": "s", "steps": []}):
        with pytest.raises(ValueError, match="region"):
            Region.from_dict(bad)
