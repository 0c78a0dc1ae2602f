"""Numbers from files and flags, table-driven (issue 17, properties 3-5): each case names its exact outcome.

``ONNX_NUMBERS`` / ``METADATA`` / ``CONFIGS`` / ``PROGRAMS``: a bad number is refused where it enters,
in one line naming the node / key / field and the allowed range (property 3). ``INF_INPUTS``,
``QUANTIZE`` and ``ACC_BOUND``: no silent wrong number: +-Inf inputs saturate as onnxruntime does,
NaN is refused, a layer whose int32 accumulator could overflow is not folded (property 4).
``REASONS`` / ``FOLDED``: a fallback reason says what is there, and what the docs call supported
runs on the NPU, equal to ``offload=False`` (property 5).
"""
from __future__ import annotations

import json
import re
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ioso_tvm
from hw_model import reference as ref
from hw_model.config import DEFAULT_CONFIG, MAC_BLOCK, NPUConfig
from hw_model.instructions import BLOCK
from hw_model.isa import Program
from hw_model.layer_specs import ConvSpec
from hw_model.layers import build_conv
from hw_model.reference import acc_overflow
from ioso_tvm.frontend import import_onnx
from ioso_tvm.testing import QDQBuilder, T
from target_npu.transform.fold_qdq import find_layers


# ------------------------------------------------------------------------------ helpers
def _conv_model(isg: bool = True, **kw):
    b = QDQBuilder((1, 16, 5, 5), np.random.default_rng(0))
    y = b.conv(b.input, 16, isg=isg, **kw)
    return b, y, b.model([y])


def _node(m: onnx.ModelProto, op: str, k: int = 0) -> onnx.NodeProto:
    return [n for n in m.graph.node if n.op_type == op][k]


def _set(m: onnx.ModelProto, name: str, arr) -> onnx.ModelProto:
    for init in m.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(np.asarray(arr), name))
            return m
    raise KeyError(name)


def _get(m: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in m.graph.initializer if i.name == name)


def _edit(op: str, k: int, inp: int, fn):
    """A conv model whose ``inp``-th input of the ``k``-th ``op`` node is replaced by ``fn(value)``."""
    def build():
        m = _conv_model()[2]
        name = _node(m, op, k).input[inp]
        return _set(m, name, fn(_get(m, name).copy()))
    return build


def _at0(v):
    def fn(a):
        a.flat[0] = v
        return a
    return fn


def _raw_int8(op: str, k: int, inp: int, value: int):
    """The initializer stored as int32_data with an out-of-range value (numpy_helper would wrap it)."""
    def build():
        m = _conv_model()[2]
        name = _node(m, op, k).input[inp]
        a = _get(m, name)
        vals = a.astype(np.int64).reshape(-1).tolist()
        vals[0] = value
        t = TensorProto(name=name, data_type=TensorProto.INT8, dims=list(a.shape))
        t.int32_data.extend(vals)
        next(i for i in m.graph.initializer if i.name == name).CopyFrom(t)
        return m
    return build


def _zp_shape():
    m = _conv_model()[2]
    name = _node(m, "QuantizeLinear", 1).input[2]
    return _set(m, name, np.zeros(2, _get(m, name).dtype))


def _zp_int32_on_quantize():
    m = _conv_model()[2]
    q = _node(m, "QuantizeLinear", 1)
    m.graph.initializer.append(numpy_helper.from_array(np.int32(0), "zp32"))
    q.input[2] = "zp32"
    return m


def _tiny_out_scale(op: str):
    def build():
        rng = np.random.default_rng(0)
        b = QDQBuilder((1, 16, 5, 5), rng)
        y = b.conv(b.input, 16, isg=False)
        z = b.add(y, b.conv(y, 16, isg=False)) if op == "add" else y
        m = b.model([z])
        return _set(m, _node(m, "QuantizeLinear", -1).input[1], np.float32(1e-45))
    return build


ONNX_NUMBERS = [  # id, model builder, message (the node and input named)
    ("input scale NaN", _edit("QuantizeLinear", 0, 1, lambda a: np.float32(np.nan)),
     r"QuantizeLinear #0 \(output 'q\d+'\): scale 's\d+' must be finite and > 0, got nan"),
    ("input scale 0", _edit("QuantizeLinear", 0, 1, lambda a: np.float32(0)),
     r"scale 's\d+' must be finite and > 0, got 0.0"),
    ("output scale negative", _edit("QuantizeLinear", 1, 1, lambda a: np.float32(-0.1)),
     r"QuantizeLinear #\d+ .*must be finite and > 0, got -0.1"),
    ("output scale +Inf", _edit("QuantizeLinear", 1, 1, lambda a: np.float32(np.inf)),
     r"must be finite and > 0, got inf"),
    ("weight scale NaN", _edit("DequantizeLinear", 1, 1, _at0(np.nan)),
     r"DequantizeLinear #\d+ \(output 'wdq\d+'\): scale 'sw\d+' .* got nan at index \(0,\)"),
    ("weight scale 0", _edit("DequantizeLinear", 1, 1, _at0(0)), r"scale 'sw\d+' must be finite and > 0, got 0.0"),
    ("weight scales one short", _edit("DequantizeLinear", 1, 1, lambda a: a[:-1]),
     r"15 scales in 'sw\d+' for axis 0 of 'wq\d+' \(shape \[16, 16, 3, 3\]\)"),
    ("weight scale 2-D", _edit("DequantizeLinear", 1, 1, lambda a: a.reshape(4, 4)), r"scalar or 1-D .*\[4, 4\]"),
    ("zero point shape differs from the scale", _zp_shape,
     r"zero point 'zp\d+' has shape \[2\], its scale 's\d+' \[\]"),
    ("int32 zero point on a QuantizeLinear", _zp_int32_on_quantize, r"zero point 'zp32' must be int8/uint8, got int32"),
    ("zero point stored out of int8 range", _raw_int8("QuantizeLinear", 0, 2, 300),
     r"initializer 'zp\d+' holds 300, outside the int8 range -128..127"),
    ("weights stored out of int8 range", _raw_int8("DequantizeLinear", 1, 0, -200),
     r"initializer 'wq\d+' holds -200, outside the int8 range"),
    ("bias NaN", _edit("Conv", 0, 2, _at0(np.nan)),
     r"Conv 'conv\d+': input 2 'b\d+' holds nan at index \(0,\); it must be finite"),
    ("bias -Inf", _edit("Conv", 0, 2, _at0(-np.inf)), r"Conv 'conv\d+': input 2 'b\d+' holds -inf"),
    ("ISG gamma NaN", _edit("Mul", 0, 1, _at0(np.nan)), r"Mul #\d+ \(output 'isg\d+'\): input 1 'gamma\d+' holds nan"),
    ("OSO scale +Inf", _edit("Mul", 1, 1, _at0(np.inf)), r"Mul #\d+ \(output 'oso_m\d+'\): input 1 'g\d+' holds inf"),
    ("OSO offset NaN", _edit("Add", 0, 1, _at0(np.nan)), r"Add #\d+ \(output 'oso_a\d+'\): input 1 'phi\d+' holds nan"),
    ("Clip bound NaN", _edit("Clip", 0, 2, lambda a: np.float32(np.nan)),
     r"Clip #\d+ .*a Clip bound 'cmax\d+' holds nan"),
    ("NORM constant beyond float32 (tiny output scale)", _tiny_out_scale("conv"),
     r"layer conv1: constant m = inf is not finite in float32"),
    ("add constant beyond float32 (tiny output scale)", _tiny_out_scale("add"),
     r"layer add\d+: constant ma = inf is not finite in float32"),
]


@pytest.mark.parametrize("build, match", [c[1:] for c in ONNX_NUMBERS], ids=[c[0] for c in ONNX_NUMBERS])
def test_onnx_numbers_refused_at_load(build, match):
    with pytest.raises(ValueError, match=match) as e:
        ioso_tvm.compile(build())
    assert "\n" not in str(e.value)


def _meta(edit):
    def build():
        m = _conv_model()[2]
        meta = json.loads(m.metadata_props[0].value)
        meta = edit(meta)
        m.metadata_props[0].value = json.dumps(meta)
        return m
    return build


def _layer_key(meta, key, v):
    next(iter(meta["layers"].values()))[key] = v
    return meta


METADATA = [  # id, builder, message
    ("metadata a JSON list", _meta(lambda d: [d]), r"must be a JSON object, got a JSON list"),
    ("format_version true", _meta(lambda d: {**d, "format_version": True}), r"format_version True unsupported"),
    ("format_version 1.0", _meta(lambda d: {**d, "format_version": 1.0}), r"format_version 1.0 unsupported"),
    ("isg_shift a string", _meta(lambda d: {**d, "isg_shift": "4"}), r"isg_shift must be an int in 1..31, got '4'"),
    ("isg_group_signs with a bool", _meta(lambda d: {**d, "isg_group_signs": [0, -1, True]}),
     r"isg_group_signs must be a list of ints"),
    ("wbits 1.5", _meta(lambda d: _layer_key(d, "wbits", 1.5)),
     r"layers\['conv\d+'\]: wbits must be an int in 2..8, got 1.5"),
    ("wbits 12", _meta(lambda d: _layer_key(d, "wbits", 12)), r"wbits must be an int in 2..8, got 12"),
    ("abits_out NaN", _meta(lambda d: _layer_key(d, "abits_out", float("nan"))),
     r"abits_out must be an int in 2..8, got nan"),
    ("layers naming no node", _meta(lambda d: {**d, "layers": {"ghost": {"wbits": 4}}}),
     r"layers\['ghost'\] names no node of the graph"),
    ("layers a list", _meta(lambda d: {**d, "layers": [1]}), r"layers must be an object"),
]


@pytest.mark.parametrize("build, match", [c[1:] for c in METADATA], ids=[c[0] for c in METADATA])
def test_metadata_numbers_refused(build, match):
    with pytest.raises(ValueError, match=match):
        import_onnx(build(), DEFAULT_CONFIG)


CONFIGS = [  # id, NPUConfig keyword arguments (or a from_dict dict), message
    ("pe_arrays 2.5", {"pe_arrays": 2.5}, r"NPUConfig.pe_arrays must be a positive int, got 2.5 \(float\)"),
    ("pe_arrays True", {"pe_arrays": True}, r"NPUConfig.pe_arrays must be a positive int, got True \(bool\)"),
    ("scratchpad_kib a string", {"scratchpad_kib": "512"}, r"scratchpad_kib must be a positive int, got '512'"),
    ("pixels_per_cycle 0", {"pixels_per_cycle": 0}, r"pixels_per_cycle must be positive, got 0"),
    ("clock_mhz NaN", {"clock_mhz": float("nan")}, r"clock_mhz must be a finite positive number, got nan"),
    ("clock_mhz True", {"clock_mhz": True}, r"clock_mhz must be a finite positive number, got True"),
    ("dram_bytes_per_cycle Inf", {"dram_bytes_per_cycle": float("inf")}, r"dram_bytes_per_cycle must be a finite"),
    ("mac_rows 8", {"mac_rows": 8}, r"mac_rows must be 16: the ISA's channel block .*BLOCK.* got 8"),
    ("mac_cols 32", {"mac_cols": 32}, r"mac_cols must be 16"),
    ("acc_bits 16", {"acc_bits": 16}, r"acc_bits must be 32: .*int32, got 16"),
    ("isg_group_signs with True", {"isg_group_signs": (0, True)},
     r"isg_group_signs must be a non-empty tuple of -1/0/\+1"),
    ("isg_group_signs a string (from_dict)", {"from_dict": {"isg_group_signs": "0,1"}},
     r"isg_group_signs must be a list"),
    ("granularity 4.0 (from_dict)", {"from_dict": {"granularity": 4.0}},
     r"granularity must be a positive int, got 4.0"),
]


@pytest.mark.parametrize("kw, match", [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_npu_config_numbers_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        NPUConfig.from_dict(kw["from_dict"]) if "from_dict" in kw else NPUConfig(**kw)


def test_npu_config_normalises_numpy_numbers_and_ties_the_block():
    cfg = NPUConfig(pe_arrays=np.int64(2), clock_mhz=np.float32(500), dram_bytes_per_cycle=32)
    assert (type(cfg.pe_arrays), type(cfg.clock_mhz), type(cfg.dram_bytes_per_cycle)) == (int, float, float)
    assert MAC_BLOCK == BLOCK == DEFAULT_CONFIG.mac_rows == DEFAULT_CONFIG.mac_cols


def _prog_json() -> dict:
    rng = np.random.default_rng(0)
    spec = ConvSpec(1, 16, 4, 4, 16, rng.integers(-8, 8, (16, 16, 3, 3)).astype(np.int8),
                    np.full(16, 1e-2, np.float32), np.zeros(16, np.float32), pads=(1, 1, 1, 1), x_zp=3)
    return json.loads(build_conv(spec).to_json())


def _instr(op: str, field: str, value):
    def act():
        d = _prog_json()
        ins = next(i for i in d["instrs"] if i["op"] == op and (field != "pad_value" or i["pad_top"]))
        ins[field] = value
        Program.from_json(json.dumps(d)).validate()
    return act


def _region(field: str, value):
    def act():
        d = _prog_json()
        r = next(r for r in d["regions"] if r["kind"] == "const")
        r[field] = value
        Program.from_json(json.dumps(d)).validate()
    return act


def _top(key: str, value):
    def act():
        d = _prog_json()
        d[key] = value
        Program.from_json(json.dumps(d))
    return act


PROGRAMS = [  # id, action, message (instruction and field named)
    ("LOAD pad_value NaN", _instr("LOAD", "pad_value", float("nan")),
     r"#\d+ \(LOAD\): pad_value must be a finite number, got nan"),
    ("LOAD pad_value 300 into spad", _instr("LOAD", "pad_value", 300),
     r"#\d+ \(LOAD\): pad_value 300 is not representable in spad .*integer in -128..255"),
    ("LOAD pad_value 1.5 into spad", _instr("LOAD", "pad_value", 1.5), r"pad_value 1.5 is not representable in spad"),
    ("LOAD pad_value a string", _instr("LOAD", "pad_value", "0"), r"pad_value must be a finite number, got '0'"),
    ("GEMM accumulate 1", _instr("GEMM", "accumulate", 1),
     r"#\d+ \(GEMM\): field accumulate must be true or false, got 1"),
    ("LOAD push_next 'yes'", _instr("LOAD", "push_next", "yes"), r"\(LOAD\): field push_next must be true or false"),
    ("GEMM zp 300", _instr("GEMM", "zp", 300), r"\(GEMM\): field zp = 300 must be in -128..255"),
    ("NORM_ACT_QUANT lo 1.5", _instr("NORM_ACT_QUANT", "lo", 1.5),
     r"\(NORM_ACT_QUANT\): field lo must be an int, got 1.5"),
    ("NORM_ACT_QUANT out_dtype 7", _instr("NORM_ACT_QUANT", "out_dtype", 7),
     r"field out_dtype must be a string, got 7"),
    ("region dtype float64", _region("dtype", "float64"), r"DRAM region '\w+': dtype 'float64' not in"),
    ("region size a string", _region("size", "12"), r"DRAM region '\w+': size must be a non-negative int, got '12'"),
    ("region data shorter than its size", _region("data_b64", "AAAA"), r"data_b64 holds 3 bytes"),
    ("instrs not a list", _top("instrs", {"op": "LOAD"}), r"'instrs' must be a JSON list"),
]


@pytest.mark.parametrize("action, match", [c[1:] for c in PROGRAMS], ids=[c[0] for c in PROGRAMS])
def test_program_fields_refused(action, match):
    with pytest.raises(ValueError, match=match):
        action()


# ------------------------------------------------------------------------- property 4
def _qdq_only(signed: bool, bits: int) -> tuple[QDQBuilder, T, onnx.ModelProto]:
    b = QDQBuilder((1, 16, 4, 4), np.random.default_rng(3), abits=bits, signed=signed)
    return b, b.input, b.model([b.input])


INF_INPUTS = [  # id, signed input, bits: the input quantizer alone (Clip for < 8 bits)
    ("int8", True, 8),
    ("uint8", False, 8),
    ("int4 (Clip before QuantizeLinear)", True, 4),
]


def _special(shape) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    x.flat[:6] = [np.inf, -np.inf, 3e38, -3e38, np.float32(1e-45), -0.0]
    return x


@pytest.mark.parametrize("signed, bits", [c[1:] for c in INF_INPUTS], ids=[c[0] for c in INF_INPUTS])
def test_inf_inputs_saturate_like_onnxruntime(signed, bits):
    b, t, m = _qdq_only(signed, bits)
    x = _special(b.shape)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ioso_tvm.compile(m).run(x)
    assert np.array_equal(got, want)
    assert got.flat[0] == np.float32(t.scale) * (t.hi - t.zp) and got.flat[1] == np.float32(t.scale) * (t.lo - t.zp)


def test_inf_input_through_an_npu_conv_equals_the_contract_and_offload_false():
    b, y, m = _conv_model()
    x = _special(b.shape)
    got = ioso_tvm.compile(m).run(x)
    assert np.array_equal(got, b.run_reference(x, [y])[0])
    assert np.array_equal(got, ioso_tvm.compile(m, offload=False).run(x))


NAN_RUNS = [  # id, positions of NaN (flat indices), message
    ("one NaN", [0], r"model input 'input' holds 1 NaN value\(s\) \(first at index \(0, 0, 0, 0\)\)"),
    ("NaN in the middle", [37, 38], r"holds 2 NaN value\(s\) \(first at index \(0, 1, 2, 2\)\)"),
]


@pytest.mark.parametrize("where, match", [c[1:] for c in NAN_RUNS], ids=[c[0] for c in NAN_RUNS])
def test_nan_input_refused_at_run(where, match):
    b, y, m = _conv_model()
    x = np.zeros(b.shape, np.float32)
    x.flat[where] = np.nan
    with pytest.raises(ValueError, match=match):
        ioso_tvm.compile(m).run(x)


QUANTIZE = [  # id, x, scale, zp, lo, hi, expected integers (None: ValueError)
    ("+Inf saturates to hi", [np.inf], 0.1, 3, -8, 7, [7]),
    ("-Inf saturates to lo", [-np.inf], 0.1, 3, -8, 7, [-8]),
    ("x / scale beyond float32 saturates", [3e38, -3e38], 1e-3, 0, -128, 127, [127, -128]),
    ("NaN refused", [0.0, np.nan], 0.1, 0, -128, 127, None),
]


@pytest.mark.parametrize("x, s, zp, lo, hi, want", [c[1:] for c in QUANTIZE], ids=[c[0] for c in QUANTIZE])
def test_reference_quantize_of_non_finite(x, s, zp, lo, hi, want):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if want is None:
            with pytest.raises(ValueError, match=r"input holds 1 NaN value\(s\) \(first at index \(1,\)\)"):
                ref.quantize(np.array(x, np.float32), s, zp, lo, hi)
        else:
            assert ref.quantize(np.array(x, np.float32), s, zp, lo, hi).tolist() == want


_CAP = 2**31 // (255 * 128)  # 65793 MACs of (255 - 0) * -128 fit int32; one more does not


ACC_BOUND = [  # id, weight value, channels, ISG group of every channel, input dtype, zp, groups, reason (None: fits)
    ("uint8 x -128 at the bound", -128, _CAP, 0, "uint8", 0, 1, None),
    ("uint8 x -128 one MAC over", -128, _CAP + 1, 0, "uint8", 0, 1, r"D1 partial sum of ISG group 0 .*-2147516160"),
    ("int8 zp -128 is the same operand range", -128, _CAP + 1, 0, "int8", -128, 1, r"D1 partial sum of ISG group 0"),
    ("int8 zp 0: at most 128 x 128 per MAC", -128, 2**31 // (128 * 128) - 1, 0, "int8", 0, 1, None),
    ("group +1 pushes D2 over", 127, 2**31 // (255 * 127) - 1000, 2, "uint8", 0, 1, r"the D2 sum of output channel"),
    ("group -1 keeps D2 in, D1 over", -128, _CAP + 1, 1, "uint8", 0, 1, r"D1 partial sum of ISG group 1"),
    ("grouped conv counts its own channels", -128, 2 * _CAP, 0, "uint8", 0, 2, None),
]


@pytest.mark.parametrize("w, c, g, dt, zp, groups, reason", [a[1:] for a in ACC_BOUND], ids=[a[0] for a in ACC_BOUND])
def test_accumulator_bound_is_proven_per_layer(w, c, g, dt, zp, groups, reason):
    weights = np.full((2, c // groups, 1, 1), w, np.int8)
    why = acc_overflow(weights, np.full(c, g, np.int64), groups, dt, zp, DEFAULT_CONFIG)
    assert why is None if reason is None else re.search(reason, why), why


def _wide_conv(c: int):
    b = QDQBuilder((1, c, 1, 1), np.random.default_rng(5), signed=False)
    y = b.conv(b.input, 2, kernel=1, pad=0, isg=False, oso=False)
    m = b.model([y])
    wq = _node(m, "DequantizeLinear", 1).input[0]
    return b, y, _set(m, wq, np.full((2, c, 1, 1), -128, np.int8))


def test_layer_that_could_overflow_int32_stays_a_float_chain_with_the_reason():
    b, y, m = _wide_conv(70000)
    cm = ioso_tvm.compile(m)
    reasons = [f["reason"] for f in cm.report()["fallbacks"]]
    want = r"conv: worst-case int32 accumulator leaves int32: .*weights \[2, 70000, 1, 1\], uint8 input"
    assert len(reasons) == 1 and re.match(want, reasons[0]), reasons
    x = np.random.default_rng(1).uniform(0, 0.05, b.shape).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = cm.run(x)
    assert np.abs(got - want).max() <= y.scale * 1.0001
    assert np.array_equal(got, ioso_tvm.compile(m, offload=False).run(x))


# ------------------------------------------------------------------------- property 5
def _auto_pad(mode: str, stride: int):
    def build():
        b = QDQBuilder((1, 16, 6, 6), np.random.default_rng(2))
        y = b.conv(b.input, 16, stride=stride, isg=False)
        m = b.model([y])
        conv = _node(m, "Conv")
        kept = [a for a in conv.attribute if a.name not in ("pads",)]
        del conv.attribute[:]
        conv.attribute.extend([*kept, helper.make_attribute("auto_pad", mode)])
        return m
    return build


def _int32_bias():
    b = QDQBuilder((1, 16, 5, 5), np.random.default_rng(4))
    y = b.conv(b.input, 16, isg=False)
    m = b.model([y])
    conv, wdq = _node(m, "Conv"), _node(m, "DequantizeLinear", 1)
    s = (np.float32(b.input.scale) * _get(m, wdq.input[1])).astype(np.float32)
    bq = np.round(_get(m, conv.input[2]) / s).astype(np.int32)
    m.graph.initializer.extend([numpy_helper.from_array(bq, "bias_q"), numpy_helper.from_array(s, "bias_s"),
                                numpy_helper.from_array(np.zeros(16, np.int32), "bias_zp")])
    m.graph.node.insert(0, helper.make_node("DequantizeLinear", ["bias_q", "bias_s", "bias_zp"], ["bias_dq"], axis=0))
    conv.input[2] = "bias_dq"
    return m


def _pool(kernel: int, hw: int = 6):
    def build():
        b = QDQBuilder((1, 16, hw, hw), np.random.default_rng(6))
        x = b.conv(b.input, 16, isg=False)
        ap = b._uid("ap")
        b.nodes.append(helper.make_node("AveragePool", [x.name], [ap], kernel_shape=[kernel] * 2, strides=[kernel] * 2))
        o = hw // kernel
        return b.model([b._quantizer(ap, (1, 16, o, o), 8, False, None)])
    return build


FOLDED = [  # id, builder: what the docs call supported folds into NPU layers, equal to offload=False
    ("AveragePool 2x2 (int32 window sum, NORM)", _pool(2)),
    ("conv auto_pad SAME_UPPER stride 1", _auto_pad("SAME_UPPER", 1)),
    ("conv auto_pad SAME_UPPER stride 2 (odd pixel at the end)", _auto_pad("SAME_UPPER", 2)),
    ("conv auto_pad SAME_LOWER stride 2 (odd pixel at the start)", _auto_pad("SAME_LOWER", 2)),
    ("bias as DequantizeLinear(int32)", _int32_bias),
    ("AveragePool with a global kernel", _pool(6)),
]


@pytest.mark.parametrize("build", [c[1] for c in FOLDED], ids=[c[0] for c in FOLDED])
def test_documented_patterns_run_on_the_npu(build):
    m = build()
    cm = ioso_tvm.compile(m)
    rep = cm.report()
    assert not rep["fallbacks"] and all(r["device"] == "npu" for r in rep["layers"] if r["kind"] != "input"), rep
    x = np.random.default_rng(0).standard_normal([d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim])
    x = x.astype(np.float32)
    got = cm.run(x)
    assert np.array_equal(got, ioso_tvm.compile(m, offload=False).run(x))
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    s_out = float(_get(m, _node(m, "QuantizeLinear", -1).input[1]))
    assert got.shape == want.shape and np.abs(got - want).max() <= s_out * 1.0001  # one step: float vs integer


def _after_input(op: str, *consts, **attrs):
    def build():
        b = QDQBuilder((1, 16, 6, 6), np.random.default_rng(8))
        x, out = b.input, b._uid(op.lower())
        b.nodes.append(helper.make_node(op, [b.input.name, *(b._const(c, "c") for c in consts)], [out], **attrs))
        shape = (1, 16, 6, 6) if op != "MaxPool" else (1, 16, 3, 3)
        return b.model([b._quantizer(out, shape, 8, x.dtype == np.int8, None)])
    return build


def _weight_zp():
    m = _conv_model(isg=False)[2]
    return _set(m, _node(m, "DequantizeLinear", 1).input[2], np.ones(16, np.int8))


def _pad_node():
    b = QDQBuilder((1, 16, 6, 6), np.random.default_rng(9))
    pn = b._uid("pad")
    b.nodes.append(helper.make_node("Pad", [b.input.name, b._const(np.array([0, 0, 1, 1, 0, 0, 1, 1]), "pads")], [pn]))
    x = b.input
    y = b.conv(T(pn, x.scale, x.zp, x.lo, x.hi, x.dtype, (1, 16, 8, 8)), 16, pad=0, isg=False)
    return b.model([y])


def _dynamic_auto_pad():
    m = _auto_pad("SAME_UPPER", 1)()
    for d, p in zip(m.graph.input[0].type.tensor_type.shape.dim[2:], "HW"):
        d.dim_param = p
    return m


REASONS = [  # id, builder, input_shapes, the reason in the report
    ("auto_pad on an input of unknown size", _dynamic_auto_pad, {"input": [1, 16, 6, 6]},
     r"conv input goes through a separate pad op \(ONNX auto_pad=SAME_\*"),
    ("Pad node before the conv", _pad_node, None, r"separate pad op .*or a Pad node"),
    ("weight zero point 1", _weight_zp, None, r"weight zero point is not 0"),
    ("Sigmoid before the quantizer", _after_input("Sigmoid"), None,
     r"Sigmoid runs on the CPU: the NPU's ACT stage only clips"),
    ("add of a float constant", _after_input("Add", np.float32(0.5)), None,
     r"a quantized tensor times / plus a constant is not an NPU layer"),
    ("max pool that requantizes", _after_input("MaxPool", kernel_shape=[2, 2], strides=[2, 2]), None,
     r"max pool requantizes \(scale/zero point"),
]


@pytest.mark.parametrize("build, shapes, reason", [c[1:] for c in REASONS], ids=[c[0] for c in REASONS])
def test_fallback_reason_tells_the_truth(build, shapes, reason):
    layers, fallbacks = find_layers(import_onnx(build(), DEFAULT_CONFIG, shapes)[0], DEFAULT_CONFIG)
    assert len(fallbacks) == 1 and re.search(reason, fallbacks[0][1]), fallbacks
    assert "not a dequantized tensor" not in fallbacks[0][1]


CLI_OPTIONS = [  # id, target option, words of the one-line error
    ("clock NaN", "--target-ioso_npu-clock_mhz=nan", "NPUConfig.clock_mhz must be a finite positive number"),
    ("mac_rows 8", "--target-ioso_npu-mac_rows=8", "NPUConfig.mac_rows must be 16"),
    ("acc_bits 24", "--target-ioso_npu-acc_bits=24", "NPUConfig.acc_bits must be 32"),
]


@pytest.mark.parametrize("option, words", [c[1:] for c in CLI_OPTIONS], ids=[c[0] for c in CLI_OPTIONS])
def test_cli_config_number_one_line(tmp_path, capsys, option, words):
    from ioso_tvm.tvmc.cli import main as tvmc

    path = tmp_path / "m.onnx"
    onnx.save(_conv_model()[2], str(path))
    rc = tvmc(["compile", str(path), "--target=ioso_npu", option, "-o", str(tmp_path / "o.tar")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and words in err[0], err
