"""NPU regions as ONE stored instruction stream over one DRAM image: linking, memory plan, channel
order carried by the producers, gathered loads on fan-out conflicts, the planner mutation, the
artifact running its stored stream."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

import ioso_tvm
from hw_model.config import DEFAULT_CONFIG as CFG
from hw_model.isa import Load, NormActQuant, Store, Sync
from ioso_tvm.testing import QDQBuilder, granular_groups
from target_npu.transform.permute_groups import is_contiguous, wished_order


def _isg_chain(rng, c=48):
    """conv -> conv(ISG, shuffled groups) -> maxpool -> conv(ISG) -> gap -> linear: producers permutable."""
    b = QDQBuilder((2, 8, 8, 8), rng)
    x = b.conv(b.input, c, isg=False)
    x = b.conv(x, c, group_vec=granular_groups(c, rng, CFG))
    while is_contiguous(x_groups := granular_groups(c, rng, CFG), CFG):
        pass
    x = b.maxpool(x)
    y = b.conv(x, 32, group_vec=x_groups)
    return b, b.linear(b.gap(y), 10)


def _fanout_conflict(rng):
    """One tensor, two ISG consumers wanting different channel orders."""
    b = QDQBuilder((1, 16, 6, 6), rng)
    x = b.conv(b.input, 48, isg=False)
    g1 = granular_groups(48, rng, CFG)
    while True:
        g2 = granular_groups(48, rng, CFG)
        if not is_contiguous(g2[wished_order(g1, CFG)], CFG):
            break
    return b, [b.conv(x, 16, group_vec=g1), b.conv(x, 16, group_vec=g2)]


def _run_both(b, outs, seed, **kw):
    cm = ioso_tvm.compile(b.model(outs), **kw)
    x = np.random.default_rng(seed).standard_normal(b.shape).astype(np.float32)
    got = cm.run(x)
    got = got if isinstance(got, list) else [got]
    return cm, got, b.run_reference(x, outs)


@pytest.mark.parametrize("seed", range(3))
def test_region_is_one_stream_with_barriers_and_no_host_round_trip(seed):
    b, out = _isg_chain(np.random.default_rng(seed))
    cm, got, want = _run_both(b, [out], seed)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    assert len(cm.streams) == 1 and len(cm.regions) == 1
    st = cm.streams[0]
    secs = st.meta["layers"]
    assert [s["index"] for s in secs] == cm.regions[0].layers
    assert secs[0]["start"] == 0 and secs[-1]["end"] == len(st.instrs)
    assert all(a["end"] == b_["start"] for a, b_ in zip(secs, secs[1:]))
    assert sum(isinstance(i, Sync) for i in st.instrs) == len(secs) - 1
    # only the region's inputs and outputs are host-visible DRAM tensors; every layer output between
    # layers is a scratch tensor the host never reads or writes
    kinds = {r.kind for r in st.regions.values()}
    assert kinds <= {"input", "output", "scratch", "const"}
    n_scratch = sum(r.kind == "scratch" for r in st.regions.values())
    assert n_scratch == len(secs) - len(st.meta["outputs"])
    cm.run(np.zeros(b.shape, np.float32))
    assert cm.profile.host_transfers == len(st.meta["inputs"]) + len(st.meta["outputs"])
    # every LOAD of a layer output reads the tensor the producer STOREd (same DRAM region)
    stored = {i.region for i in st.instrs if isinstance(i, Store)}
    loaded = {i.region for i in st.instrs if isinstance(i, Load) and st.regions[i.region].kind != "const"}
    assert loaded - stored == set(st.meta["inputs"])


def test_memory_plan_reuses_bytes_and_stays_exact():
    b, out = _isg_chain(np.random.default_rng(5))
    cm, got, want = _run_both(b, [out], 5)
    cm2, got2, _ = _run_both(b, [out], 5, memory_reuse=False)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got2[0], want[0])
    mem, mem2 = cm.streams[0].meta["memory"], cm2.streams[0].meta["memory"]
    assert mem["activation_peak_bytes"] < mem2["activation_peak_bytes"] == mem2["activation_total_bytes"]
    assert cm.report()["dram_peak_bytes"] == mem["dram_bytes"] < mem2["dram_bytes"]
    addrs = {(r.addr, r.name) for r in cm.streams[0].regions.values() if r.kind != "const"}
    assert len({a for a, _ in addrs}) < len(addrs)  # some tensors really share bytes


@pytest.mark.parametrize("seed", range(3))
def test_planner_off_costs_cycles_and_stays_exact(seed):
    """Mutation test: the permutation is real only if turning the planner off changes something."""
    b, out = _isg_chain(np.random.default_rng(seed))
    on, got_on, want = _run_both(b, [out], seed)
    off, got_off, _ = _run_both(b, [out], seed, permute_groups=False)
    assert np.array_equal(got_on[0], want[0]) and np.array_equal(got_off[0], want[0])
    r_on, r_off = on.report(), off.report()
    assert r_on["permutes"]["permuted_tensors"] > 0 and r_off["permutes"]["permuted_tensors"] == 0
    assert r_off["explicit_permutes"] > r_on["explicit_permutes"]
    assert r_off["total_cycles"] > r_on["total_cycles"]
    assert r_off["explicit_permute_cycles"] > 0


def test_fanout_conflict_gets_an_explicit_reorder_and_stays_exact():
    b, outs = _fanout_conflict(np.random.default_rng(3))
    cm, got, want = _run_both(b, outs, 3)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    rep = cm.report()
    assert rep["permutes"]["gathered_loads"] == 1 == rep["explicit_permutes"]  # one consumer reorders
    assert rep["explicit_permute_cycles"] > 0
    reordered = [r for r in rep["layers"] if r["gathered_loads"] or r["permutes"]]
    assert len(reordered) == 1 and reordered[0]["kind"] == "conv"


@pytest.mark.parametrize("seed", range(4))
def test_the_cheaper_of_gather_and_permute_is_linked(seed):
    """A conv re-reading its gathered input per output-block tile gets an explicit PERMUTE when the cycle
    model says it is cheaper; either way the result is exact and never slower than gathering."""
    from hw_model.config import NPUConfig

    rng = np.random.default_rng(seed)
    b = QDQBuilder((1, 16, 12, 12), rng)
    x = b.conv(b.input, 64, isg=False)
    g1 = granular_groups(64, rng, CFG)
    while is_contiguous(g2 := granular_groups(64, rng, CFG), CFG) or np.array_equal(g1, g2):
        pass
    outs = [b.conv(x, 128, group_vec=g1), b.conv(x, 128, group_vec=g2)]
    small = NPUConfig(acc_buf_kib=16, isg_d1_kib=16)  # small tiles: the input is re-read per output tile
    cm, got, want = _run_both(b, outs, seed, config=small)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    st = cm.streams[0]
    perms = [s for s in st.meta["layers"] if s.get("permute")]
    assert [s["index"] for s in st.meta["layers"] if not s.get("permute")] == cm.regions[0].layers
    assert len(perms) + sum(s["gathered_loads"] > 0 for s in st.meta["layers"] if not s.get("permute")) == 1
    if perms:  # the permuted copy is a scratch tensor read by the consumer with plain loads
        sec = perms[0]
        stores = {i.region for i in st.instrs[sec["start"]:sec["end"]] if isinstance(i, Store)}
        assert len(stores) == 1 and st.regions[stores.pop()].kind == "scratch"


def _edit_member(src, dst, name, edit):
    with tarfile.open(src) as t:
        members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
    members[name] = edit(members[name])
    import hashlib
    man = json.loads(members["manifest.json"])
    man["members"][name] = hashlib.sha256(members[name]).hexdigest()
    man["sizes"][name] = len(members[name])
    members["manifest.json"] = json.dumps(man).encode()
    with tarfile.open(dst, "w") as t:
        for n, data in members.items():
            info = tarfile.TarInfo(n)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_artifact_runs_the_stored_stream(tmp_path):
    rng = np.random.default_rng(9)
    b, out = _isg_chain(rng)
    cm = ioso_tvm.compile(b.model([out]))
    path = cm.export(tmp_path / "m.tar")
    fresh = ioso_tvm.compile(b.model([out]))
    loaded = ioso_tvm.load(path)
    assert [json.loads(s.to_json()) for s in loaded.streams] == [json.loads(s.to_json()) for s in fresh.streams]
    x = rng.standard_normal(b.shape).astype(np.float32)
    want = b.run_reference(x, [out])[0]
    assert np.array_equal(loaded.run(x), want)

    def clamp_last_norm(raw: bytes) -> bytes:  # hand edit: the last NORM_ACT_QUANT writes only its lo bound
        d = json.loads(raw)
        instrs = d["regions"][0]["stream"]["instrs"]
        k = max(j for j, i in enumerate(instrs) if i["op"] == "NORM_ACT_QUANT")
        instrs[k]["hi"] = instrs[k]["lo"]
        return json.dumps(d).encode()

    _edit_member(path, tmp_path / "edited.tar", "programs.json", clamp_last_norm)
    edited = ioso_tvm.load(tmp_path / "edited.tar")
    k = max(j for j, i in enumerate(edited.streams[0].instrs) if isinstance(i, NormActQuant))
    assert edited.streams[0].instrs[k].hi == edited.streams[0].instrs[k].lo
    got = edited.run(x)
    assert not np.array_equal(got, want)  # what runs is the stored stream, not a rebuilt one
    assert len(np.unique(got)) < len(np.unique(want))

    def break_memory_map(raw: bytes) -> bytes:  # two live tensors on the same bytes
        d = json.loads(raw)
        regs = {r["name"]: r for r in d["regions"][0]["stream"]["regions"]}
        regs["t0"]["addr"] = regs["in0"]["addr"]  # the first layer reads in0 while it writes t0
        return json.dumps(d).encode()

    _edit_member(path, tmp_path / "bad.tar", "programs.json", break_memory_map)
    with pytest.raises(ValueError, match="stored NPU streams are invalid"):
        ioso_tvm.load(tmp_path / "bad.tar")


def test_boundary_layout_changes_are_host_graph_ops():
    b, out = _isg_chain(np.random.default_rng(1))
    cm = ioso_tvm.compile(b.model([out]))
    st = cm.streams[0]
    main = cm.ir_module["main"].script()
    call = next(line for line in main.splitlines() if st.meta["symbol"] in line)
    # the region function takes the NPU layout: the 8-channel NCHW input as (N, H, W, 16)
    assert "R.permute_dims" in main and "R.nn.pad" in main
    info = st.meta["inputs"]["in0"]
    assert info["shape"] == [2, 8, 8, 8] and len(info["slots"]) == 16
    out_info = st.meta["outputs"][0]
    assert f"R.Tensor(({out_info['shape'][0]}, {len(out_info['slots'])})" in call


@pytest.mark.parametrize("seed", range(3))
def test_a_layer_reading_one_tensor_twice_runs_exact(seed):
    """x + x: the composite has one parameter, the layer two operands; both read the same DRAM tensor."""
    rng = np.random.default_rng(seed)
    b = QDQBuilder((1, 16, 5, 5), rng)
    y = b.conv(b.input, 24)
    out = b.add(y, y, act="relu")
    cm, got, want = _run_both(b, [out], seed)
    assert np.array_equal(got[0], want[0])
    step = cm.regions[0].steps[-1]
    assert len(step.inputs) == 2 and step.inputs[0] == step.inputs[1]


def test_a_tir_lowering_failure_falls_back_to_the_builder(monkeypatch, caplog):
    """A layer the TIR path cannot lower (a bug, an unsupported shape) is built by hw_model's builder, with a
    warning naming the layer; the compile goes on and stays exact."""
    from target_npu import codegen
    from target_npu.schedule import NotLowerable

    def broken(*a, **k):
        raise NotLowerable("emitter cannot map this nest")

    monkeypatch.setattr(codegen, "layer_program", broken)
    b, out = _isg_chain(np.random.default_rng(2))
    with caplog.at_level("WARNING", logger="target_npu.runtime"):
        cm, got, want = _run_both(b, [out], 2)
    assert np.array_equal(got[0], want[0])
    assert "TIR lowering failed (emitter cannot map this nest)" in caplog.text
    assert all(s["lowering"] == "build_layer" for s in cm.streams[0].meta["layers"])


@pytest.mark.parametrize("seed", range(2))
def test_every_kind_is_emitted_from_tir(seed):
    """Convs, depthwise convs with scaled ISG groups, adds, pools and the classifier: every NPU layer's
    program comes from its tensorized TIR (hw_model's builder is only the test oracle), exactly."""
    rng = np.random.default_rng(seed)
    b = QDQBuilder((1, 32, 8, 8), rng)
    x = b.conv(b.input, 32, isg=False)
    d = b.conv(x, 32, groups=32, group_vec=granular_groups(32, rng, CFG))  # depthwise, scaled groups
    y = b.maxpool(b.add(d, x))
    out = b.linear(b.gap(b.conv(y, 16)), 10)
    cm, got, want = _run_both(b, [out], seed)
    assert np.array_equal(got[0], want[0])
    rows = [r for r in cm.report()["layers"] if r["device"] == "npu"]
    assert {r["kind"] for r in rows} == {"conv", "add", "maxpool", "gap"} and len(rows) == 7
    assert all(r["lowering"] == "tir" for r in rows), [(r["name"], r["lowering"]) for r in rows]
    assert len(np.unique(cm.layers[2].isg_groups)) > 1  # the depthwise conv has scaled groups
