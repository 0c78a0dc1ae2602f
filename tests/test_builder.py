"""Builder: layouts, tilings (different programs, identical outputs), default tiling on real networks."""
import numpy as np
import pytest

from hw_model import reference as ref
from hw_model.builder import channel_slots, pack_nhwc, unpack_nhwc
from hw_model.config import DEFAULT_CONFIG
from hw_model.layer_specs import AddSpec, ConvSpec, LinearSpec, PoolSpec, Tiling
from hw_model.layers import build_conv, check_tiling, default_tiling
from hw_model.layers_alu import run_layer


def test_channel_slots_group_contiguous_whole_blocks():
    gv = np.random.default_rng(0).integers(0, 3, 50)
    slots, bgroups = channel_slots(50, gv)
    assert slots.size == 16 * len(bgroups)
    assert sorted(slots[slots >= 0].tolist()) == list(range(50))
    for j, g in enumerate(bgroups):
        chans = slots[16 * j:16 * j + 16]
        assert np.all(gv[chans[chans >= 0]] == g)
    assert bgroups == sorted(bgroups, key=[1, 2, 0].index)  # scaled groups first, unity last
    ident, bg = channel_slots(40)
    assert ident.tolist() == list(range(40)) + [-1] * 8 and bg == [0, 0, 0]
    with pytest.raises(ValueError, match="isg_groups must hold 5 values"):
        channel_slots(5, np.array([0, 1, 3, 0, 0]))


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (2, 21, 3, 4)).astype(np.int8)
    slots, _ = channel_slots(21, rng.integers(0, 3, 21))
    flat = pack_nhwc(x, slots)
    assert flat.size == 2 * 3 * 4 * slots.size and np.all(flat.reshape(2, 3, 4, -1)[..., slots < 0] == 0)
    assert np.array_equal(unpack_nhwc(flat, x.shape, slots), x)
    with pytest.raises(ValueError, match="pack_nhwc"):
        pack_nhwc(x[0], slots)


def _spec(rng, c=40, k=36, h=9, groups=1):
    return ConvSpec(1, c, h, h, k, rng.integers(-20, 20, (k, c // groups, 3, 3)).astype(np.int8),
                    rng.uniform(1e-3, 1e-2, k).astype(np.float32), rng.uniform(-2, 2, k).astype(np.float32),
                    pads=(1, 1, 1, 1), groups=groups, x_zp=-3, isg_groups=rng.integers(0, 3, c))


def test_tilings_give_different_programs_and_identical_outputs():
    rng = np.random.default_rng(2)
    spec = _spec(rng)
    x = rng.integers(-128, 128, (1, 40, 9, 9)).astype(np.int8)
    want = ref.conv2d(x, -3, spec.weight, spec.m, spec.b, -128, 127, pads=(1, 1, 1, 1), isg_groups=spec.isg_groups)
    tilings = [None, Tiling(1, 1, 1, "ob_outer", 1), Tiling(2, 3, 2, "sp_outer", 2), Tiling(3, 9, 1, "ob_outer", 2)]
    programs = set()
    for t in tilings:
        assert np.array_equal(run_layer(spec, x, tiling=t), want)
        programs.add(build_conv(spec, t).to_json())
    assert len(programs) == len(tilings)


def test_bad_tilings_and_specs_are_rejected():
    rng = np.random.default_rng(3)
    spec = _spec(rng, c=512, k=512, h=56)
    with pytest.raises(ValueError, match="overflows"):
        check_tiling(spec, Tiling(ob_tile=32, rows=56, cb_tile=32), DEFAULT_CONFIG)
    for bad, match in ((Tiling(nbuf=3), "nbuf"), (Tiling(loop_order="zz"), "loop_order"), (Tiling(rows=0), "rows")):
        with pytest.raises(ValueError, match=match):
            check_tiling(_spec(rng), bad)
    with pytest.raises(TypeError, match="Tiling"):
        check_tiling(_spec(rng), {"rows": 1})
    s = _spec(rng)
    s.weight = s.weight.astype(np.int16)
    with pytest.raises(ValueError, match="ConvSpec.weight must be int8"):
        build_conv(s)
    s = _spec(rng)
    s.m = s.m[:3]
    with pytest.raises(ValueError, match="ConvSpec.m"):
        build_conv(s)
    s = _spec(rng)
    s.lo = 200
    with pytest.raises(ValueError, match="clip bounds"):
        build_conv(s)
    with pytest.raises(ValueError, match="kind"):
        run_layer(PoolSpec("median", 1, 16, 4, 4), np.zeros((1, 16, 4, 4), np.int8))
    with pytest.raises(TypeError, match="unknown spec"):
        run_layer("conv", np.zeros(3))


def _resnet(depth):
    """(spec, kind) shapes of ResNet-18/50 at 224x224 (He et al. 2016, Table 1)."""
    out = [("conv", 3, 224, 64, 7, 2, 1), ("maxpool", 64, 112, 3, 2), ]
    h, c = 56, 64
    blocks = [2, 2, 2, 2] if depth == 18 else [3, 4, 6, 3]
    for stage, n in enumerate(blocks):
        mid = 64 * 2**stage
        k = mid if depth == 18 else 4 * mid
        for b in range(n):
            s = 2 if (b == 0 and stage > 0) else 1
            if depth == 18:
                out += [("conv", c, h, mid, 3, s, 1), ("conv", mid, h // s, k, 3, 1, 1)]
            else:
                out += [("conv", c, h, mid, 1, 1, 1), ("conv", mid, h, mid, 3, s, 1), ("conv", mid, h // s, k, 1, 1, 1)]
            if s != 1 or c != k:
                out.append(("conv", c, h, k, 1, s, 1))
            h //= s
            out.append(("add", k, h))
            c = k
    return out + [("gap", c, h), ("linear", c, 1000)]


def _mobilenetv2():
    """MobileNetV2 (Sandler et al. 2018, Table 2) at 224x224."""
    out, c, h = [("conv", 3, 224, 32, 3, 2, 1)], 32, 112
    for t, k, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1)):
        for i in range(n):
            st = s if i == 0 else 1
            if t != 1:
                out.append(("conv", c, h, c * t, 1, 1, 1))
            out.append(("conv", c * t, h, c * t, 3, st, c * t))
            h //= st
            out.append(("conv", c * t, h, k, 1, 1, 1))
            if st == 1 and c == k:
                out.append(("add", k, h))
            c = k
    return out + [("conv", 320, h, 1280, 1, 1, 1), ("gap", 1280, h), ("linear", 1280, 1000)]


@pytest.mark.parametrize("net", ["resnet18", "resnet50", "mobilenetv2"])
def test_default_tiling_valid_for_every_layer(net):
    layers = {"resnet18": lambda: _resnet(18), "resnet50": lambda: _resnet(50), "mobilenetv2": _mobilenetv2}[net]()
    for layer in layers:
        kind = layer[0]
        if kind == "conv":
            _, c, h, k, ks, s, g = layer
            p = ks // 2
            spec = ConvSpec(1, c, h, h, k, np.zeros((k, c // g, ks, ks), np.int8), np.zeros(k, np.float32),
                            np.zeros(k, np.float32), stride=(s, s), pads=(p, p, p, p), groups=g,
                            isg_groups=np.repeat(np.arange(-(-c // 16)) % 3, 16)[:c])
        elif kind == "maxpool":
            spec = PoolSpec("max", 1, layer[1], layer[2], layer[2], (3, 3), (2, 2), (1, 1, 1, 1))
        elif kind == "gap":
            spec = PoolSpec("global_avg", 1, layer[1], layer[2], layer[2])
        elif kind == "add":
            spec = AddSpec(1, layer[1], layer[2], layer[2], 0, 0, 1.0, 1.0, 0.0)
        else:
            spec = LinearSpec(1, layer[1], layer[2], np.zeros((layer[2], layer[1]), np.int8),
                              np.zeros(layer[2], np.float32), np.zeros(layer[2], np.float32))
        t = default_tiling(spec, DEFAULT_CONFIG)
        check_tiling(spec, t, DEFAULT_CONFIG)
        assert t.nbuf == 2 or kind != "conv" or layer[1] >= 512, f"{net} {layer}: not double buffered"


@pytest.mark.parametrize("spec,match", [
    (PoolSpec("avg", 1, 16, 4, 4, (2, 2), (2, 2), pads=(1, 0, 0, 0)), "no padding"),
    (PoolSpec("max", 1, 16, 4, 4, (2, 2), (2, 2), out_dtype="uint8"), "keeps the input dtype"),
    (PoolSpec("max", 0, 16, 4, 4), "PoolSpec.n"),
    (PoolSpec("max", 1, 16, 4, 4, (5, 5)), "bad window"),
    (PoolSpec("avg", 1, 16, 4, 4, (2, 2), in_dtype="int16"), "in_dtype"),
    (AddSpec(1, 4, 2, 2, 0, 0, np.ones(3), 1.0, 0.0), "AddSpec.ma"),
    (AddSpec(1, 4, 2, 2, -3, 0, 1.0, 1.0, 0.0, a_dtype="uint8"), "AddSpec.a_zp"),
    (AddSpec(1, 4, 2, 2, 0, 0, 1.0, 1.0, 0.0, b_dtype="int4"), "AddSpec.b_dtype"),
    (AddSpec(1, 4, 2, 2, 0, 0, 1.0, 1.0, 0.0, lo=5, hi=4), "clip bounds"),
    (AddSpec(1, -4, 2, 2, 0, 0, 1.0, 1.0, 0.0), "AddSpec.c"),
    (LinearSpec(2, 4, 3, np.zeros((3, 4, 1), np.int8), np.zeros(3), np.zeros(3)), "LinearSpec.weight"),
    (ConvSpec(1, 4, 2, 2, 3, np.zeros((3, 4, 3, 3), np.int8), np.zeros(3), np.zeros(3)), "output would be empty"),
    (ConvSpec(1, 4, 4, 4, 3, np.zeros((3, 4, 3, 3), np.int8), np.zeros(3), np.zeros(3), x_zp=200), "x_zp"),
    (ConvSpec(1, 4, 4, 4, 3, np.zeros((3, 4, 3, 3), np.int8), np.zeros(3), np.zeros(3), stride=(0, 1)), "stride"),
    (ConvSpec(1, 4, 4, 4, 3, np.zeros((3, 2, 3, 3), np.int8), np.zeros(3), np.zeros(3), groups=2), "groups=2"),
])
def test_spec_errors_name_the_field(spec, match):
    from hw_model.layers_alu import build_layer
    with pytest.raises(ValueError, match=match):
        build_layer(spec)


def test_check_tiling_rejects_unknown_spec():
    with pytest.raises(TypeError, match="unknown layer spec"):
        check_tiling(object(), Tiling())
