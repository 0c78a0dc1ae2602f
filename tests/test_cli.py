"""tvmc / ioso-calibrate command lines: flag parsing, target options, one-line errors, inputs, profile."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hw_model.config import NPUConfig
from ioso_tvm import cli as calib_cli
from ioso_tvm.tvmc import cli, cli_run

ALL_FIELDS = list(NPUConfig().to_dict())


def _err(capsys, argv, main=cli.main) -> tuple[int, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.err


def _assert_one_line(err: str, prog: str = "tvmc") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ")
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------- target options
def test_every_npuconfig_field_is_a_target_option(tmp_path):
    assert list(cli.NPU_OPTIONS) == ALL_FIELDS
    alt = NPUConfig(pe_arrays=2, clock_mhz=1000.0, isg_group_signs=(0, 1), granularity=32)
    argv = ["compile", "m.onnx", "--target=ioso_npu"]
    for name, value in alt.to_dict().items():
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        argv.append(f"--target-ioso_npu-{name}={text}")
    ns = cli.parse_args(argv)
    assert cli.make_config(ns.target_options) == alt


@settings(max_examples=40, deadline=None)
@given(pe=st.integers(1, 64), clock=st.floats(1.0, 5000.0, allow_nan=False), shift=st.integers(1, 31),
       signs=st.lists(st.sampled_from([-1, 0, 1]), min_size=1, max_size=5), spaced=st.booleans())
def test_option_values_parsed_by_field_type(pe, clock, shift, signs, spaced):
    sep = " " if spaced else "="
    argv = ["compile", "m.onnx", "--target", "ioso_npu, llvm", *f"--target-ioso_npu-pe_arrays{sep}{pe}".split(" "),
            f"--target-ioso_npu-clock_mhz={clock!r}", f"--target-ioso_npu-isg_shift={shift}",
            f"--target-ioso_npu-isg_group_signs=[{','.join(map(str, signs))}]"]
    cfg = cli.make_config(cli.parse_args(argv).target_options)
    assert cfg == NPUConfig(pe_arrays=pe, clock_mhz=clock, isg_shift=shift, isg_group_signs=tuple(signs))
    assert isinstance(cfg.pe_arrays, int) and isinstance(cfg.clock_mhz, float)


def test_inline_target_options_and_composite_targets():
    kinds, opts = cli.parse_target("ioso_npu -pe_arrays=2 -clock_mhz=400, llvm")
    assert kinds == ["ioso_npu", "llvm"] and opts == {"pe_arrays": 2, "clock_mhz": 400.0}
    assert cli.parse_target("llvm") == (["llvm"], {})
    assert cli.parse_target(" llvm ,ioso_npu ")[0] == ["llvm", "ioso_npu"]


@pytest.mark.parametrize("argv, match", [
    (["--target-ioso_npu-foo=1"], r"unknown target option 'foo' for ioso_npu; valid options: pe_arrays, .*clock_mhz"),
    (["--target-ioso_npu-pe_arrays=two"], r"ioso_npu-pe_arrays must be an integer, got 'two'"),
    (["--target-ioso_npu-clock_mhz=fast"], r"clock_mhz must be a number"),
    (["--target-ioso_npu-isg_group_signs=a,b"], r"isg_group_signs must be a comma-separated list of integers"),
    (["--target-ioso_npu-pe_arrays=0"], r"bad target option for ioso_npu: NPUConfig.pe_arrays must be positive"),
    (["--target-ioso_npu-isg_group_signs=0,2"], r"isg_group_signs must be a non-empty tuple of -1/0/\+1"),
    (["--target-llvm-mcpu=skylake"], r"target option '--target-llvm-mcpu' is not supported: the host part is built"),
    (["--target-tensorrt-x=1"], r"unknown target option '--target-tensorrt-x': only ioso_npu has options"),
    (["--target-ioso_npu-pe"], r"unknown target option 'pe'"),
    (["--bogus"], r"unrecognized arguments: --bogus"),
])
def test_bad_target_option_is_one_clear_line(capsys, tmp_path, argv, match):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    rc, err = _err(capsys, ["compile", str(model), "--target=ioso_npu", *argv])
    assert rc == 2
    assert re.search(match, _assert_one_line(err))


@pytest.mark.parametrize("target, match", [
    ("cuda", r"unknown target 'cuda'; valid targets: ioso_npu, llvm"),
    ("ioso_npu,", r"empty target"),
    ("llvm, llvm", r"given twice"),
    ("llvm -mcpu=x", r"target 'llvm' takes no options"),
    ("ioso_npu pe_arrays=2", r"bad target option 'pe_arrays=2'"),
    ("ioso_npu -nope=2", r"unknown target option 'nope'"),
])
def test_bad_target_string(capsys, tmp_path, target, match):
    rc, err = _err(capsys, ["compile", str(tmp_path / "m.onnx"), f"--target={target}"])
    assert rc == 2
    assert re.search(match, _assert_one_line(err))


def test_target_options_need_the_npu(capsys, tmp_path):
    rc, err = _err(capsys, ["compile", "m.onnx", "--target=llvm", "--target-ioso_npu-pe_arrays=2"])
    assert rc == 2 and "need the ioso_npu target" in _assert_one_line(err)


# ---------------------------------------------------------------------------- input shapes
@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,8}", fullmatch=True),
                       st.lists(st.integers(1, 512), min_size=1, max_size=5), min_size=1, max_size=3))
def test_input_shapes_round_trip(shapes):
    text = " ".join(f"{k}:[{','.join(map(str, v))}]" for k, v in shapes.items())
    assert cli.parse_input_shapes(text) == {k: tuple(v) for k, v in shapes.items()}


@pytest.mark.parametrize("text, match", [
    ("input", "must look like"), ("input:[1,a]", "must be integers"), ("input:[1,0]", "positive"),
    ("input:[]", "positive"), ("a:[1] a:[2]", "given twice"), ("input:[1,2] junk", "must look like"),
])
def test_bad_input_shapes(text, match):
    with pytest.raises(cli.CLIError, match=match):
        cli.parse_input_shapes(text)


# ------------------------------------------------------------------------ files and errors
def test_missing_and_wrong_files(capsys, tmp_path):
    rc, err = _err(capsys, ["compile", str(tmp_path / "nope.onnx"), "--target=ioso_npu"])
    assert rc == 2 and "model file" in _assert_one_line(err) and "does not exist" in err
    wrong = tmp_path / "m.pt"
    wrong.write_bytes(b"x")
    rc, err = _err(capsys, ["compile", str(wrong), "--target=ioso_npu"])
    assert rc == 2 and "must be a .onnx file" in _assert_one_line(err)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    rc, err = _err(capsys, ["compile", str(model), "--target=llvm", "--tuning-records", str(tmp_path / "r.json")])
    assert rc == 2 and "tuning records file" in _assert_one_line(err)
    rc, err = _err(capsys, ["compile", str(model), "--target=llvm", "-o", str(tmp_path / "out.zip")])
    assert rc == 2 and "-o/--output must name a .tar" in _assert_one_line(err)
    rc, err = _err(capsys, ["run", str(tmp_path / "nope.tar")])
    assert rc == 2 and "compiled model" in _assert_one_line(err)
    rc, err = _err(capsys, ["run", str(model), "--print-top", "x"])
    assert rc == 2 and "--print-top: invalid int value" in _assert_one_line(err)


@pytest.mark.parametrize("argv, match", [
    ([], "a command is required"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["compile"], "required: MODEL, --target"),
    (["run", "x.tar", "--fill-mode", "gauss"], "invalid choice: 'gauss'"),
    (["tune", "m.onnx", "--target=ioso_npu"], "required: -o/--output"),
    (["compile", "m.onnx", "--target=ioso_npu", "--target-ioso_npu-pe_ar=3"], "unknown target option 'pe_ar'"),
])
def test_usage_errors(capsys, argv, match):
    rc, err = _err(capsys, argv)
    assert rc == 2 and match in _assert_one_line(err)


def test_help_exits_zero(capsys):
    for argv in (["--help"], ["compile", "--help"], ["run", "--help"], ["tune", "--help"]):
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: tvmc")
    assert cli.main(["compile", "--help"]) == 0
    assert "--target-ioso_npu-isg_group_signs" in capsys.readouterr().out


def test_unexpected_errors_are_one_line(capsys, monkeypatch):
    def boom(ns):
        raise RuntimeError("first line\nsecond line\nthird\nTVMError: the real reason")

    monkeypatch.setattr(cli, "cmd_compile", boom)
    monkeypatch.setattr(cli, "parse_args", lambda argv: __import__("argparse").Namespace(func=boom))
    rc, err = _err(capsys, ["compile"], main=lambda a: cli.run_main("tvmc", cli.parse_args, a))
    assert rc == 1 and _assert_one_line(err) == "tvmc: error: RuntimeError: TVMError: the real reason"
    with pytest.raises(RuntimeError):
        cli.run_main("tvmc", cli.parse_args, ["-vv", "compile"])


def test_tune_without_tuner_or_with_wrong_target(capsys, tmp_path, monkeypatch):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    rc, err = _err(capsys, ["tune", str(model), "--target=llvm", "-o", str(tmp_path / "r.json")])
    assert rc == 2 and "needs the ioso_npu target" in _assert_one_line(err)
    rc, err = _err(capsys, ["tune", str(model), "--target=ioso_npu", "--trials=0", "-o", "r.json"])
    assert rc == 2 and "--trials must be positive" in _assert_one_line(err)
    monkeypatch.setitem(sys.modules, "target_npu.tuner", None)  # as if the tuner were not installed
    rc, err = _err(capsys, ["tune", str(model), "--target=ioso_npu", "-o", str(tmp_path / "r.json")])
    assert rc == 2 and "tvmc tune is not available" in _assert_one_line(err)


def test_console_scripts_installed():
    bindir = Path(sys.executable).parent
    for prog in ("tvmc", "ioso-calibrate"):
        res = subprocess.run([str(bindir / prog), "--nope"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2
        _assert_one_line(res.stderr, prog)


# --------------------------------------------------------------------------- run helpers
SPECS = [("input", (2, 1, 4, 4), "float32"), ("mask", (2, 3), "int8")]


@pytest.mark.parametrize("mode", ["random", "zeros", "ones"])
def test_fill_modes(mode):
    a = cli_run.make_inputs(SPECS, None, mode, seed=3)
    b = cli_run.make_inputs(SPECS, None, mode, seed=3)
    for name, shape, dtype in SPECS:
        assert a[name].shape == shape and a[name].dtype == np.dtype(dtype)
        assert np.array_equal(a[name], b[name])
    if mode == "zeros":
        assert not any(v.any() for v in a.values())
    if mode == "ones":
        assert all((v == 1).all() for v in a.values())
    if mode == "random":
        assert a["input"].std() > 0.1 and len(np.unique(a["mask"])) > 1


def test_inputs_from_npz(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=x)
    got = cli_run.make_inputs(SPECS, str(tmp_path / "in.npz"), "zeros", seed=0)
    assert np.array_equal(got["input"], x) and not got["mask"].any()
    np.savez(tmp_path / "bad_name.npz", image=x)
    with pytest.raises(cli.CLIError, match=r"unknown input\(s\) \['image'\]; the model's inputs are \['input'"):
        cli_run.make_inputs(SPECS, str(tmp_path / "bad_name.npz"), "zeros", 0)
    np.savez(tmp_path / "bad_shape.npz", input=x[:1])
    with pytest.raises(cli.CLIError, match=r"input 'input' is float32\[1, 1, 4, 4\], the model expects float32\[2, 1"):
        cli_run.make_inputs(SPECS, str(tmp_path / "bad_shape.npz"), "zeros", 0)
    np.savez(tmp_path / "bad_dtype.npz", input=x.astype(np.float64))
    with pytest.raises(cli.CLIError, match="is float64"):
        cli_run.make_inputs(SPECS, str(tmp_path / "bad_dtype.npz"), "zeros", 0)
    np.savez(tmp_path / "pickled.npz", input=np.array([{"a": 1}], dtype=object))
    with pytest.raises(cli.CLIError, match="not a readable npz without pickle"):
        cli_run.make_inputs(SPECS, str(tmp_path / "pickled.npz"), "zeros", 0)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(cli.CLIError, match="not a readable npz"):
        cli_run.make_inputs(SPECS, str(tmp_path / "junk.npz"), "zeros", 0)


def test_profile_table_and_plot(tmp_path):
    report = {"layers": [{"name": "conv0", "device": "npu", "cycles": 1600, "mac_utilisation": 0.5, "groups": 3},
                         {"name": "softmax", "device": "cpu", "cpu_reason": "softmax: no NPU op"}],
              "fallbacks": [{"tensor": "t3", "op": "qdq", "reason": "float Sigmoid"},
                            {"tensor": "s", "op": "softmax", "reason": "softmax: no NPU op"}]}
    table = cli_run.format_profile(report, clock_mhz=800.0).splitlines()
    assert table[0].split() == ["layer", "on", "cycles", "us", "MAC", "util", "groups", "CPU", "reason"]
    assert table[1].split() == ["conv0", "NPU", "1600", "2.00", "50.0%", "3"]
    assert table[2].split() == ["softmax", "CPU", "-", "-", "-", "-", "softmax:", "no", "NPU", "op"]
    assert table[3].split() == ["t3", "(qdq)", "CPU", "-", "-", "-", "-", "float", "Sigmoid"]
    assert table[4].split() == ["total", "1600", "2.00"] and len(table) == 5
    png = cli_run.plot_profile(report, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- ioso-calibrate
@pytest.mark.parametrize("argv, match", [
    (["--model", "nope"], "unknown --model 'nope'; known: "),
    (["--model", "resnet20", "--wbits", "1"], "--wbits must be in 2..8, got 1"),
    (["--model", "resnet20", "--abits", "9"], "--abits must be in 2..8, got 9"),
    (["--model", "resnet18", "--pretrained"], "no shipped checkpoint for 'resnet18'"),
    (["--model", "resnet20", "--method", "magic"], "invalid choice: 'magic'"),
    (["--model", "resnet20", "--data", "nope.npz"], "--data file 'nope.npz' does not exist"),
    (["--model", "resnet20", "--iters", "-1"], "--iters must be >= 0"),
    (["--model", "resnet20", "--num-samples", "0"], "--num-samples must be positive"),
])
def test_calibrate_usage_errors(capsys, tmp_path, argv, match):
    rc, err = _err(capsys, [*argv, "-o", str(tmp_path / "m.onnx")], main=calib_cli.main)
    assert rc == 2 and match in _assert_one_line(err, "ioso-calibrate")
    rc, err = _err(capsys, ["--model", "resnet20", "-o", "m.tar"], main=calib_cli.main)
    assert rc == 2 and "must name an .onnx file" in err


def test_calibration_data_files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 1, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    assert np.array_equal(calib_cli.load_calib_inputs(str(tmp_path / "x.npz"), 3, (1, 32, 32)), x[:3])
    images = rng.integers(0, 256, (4, 28, 28)).astype(np.uint8)
    np.savez(tmp_path / "img.npz", images=images)
    from ioso_tvm.datasets import to_model_input

    got = calib_cli.load_calib_inputs(str(tmp_path / "img.npz"), 100, (1, 32, 32))
    assert np.array_equal(got, to_model_input(images))
    shipped = calib_cli.load_calib_inputs("shipped", 20, (1, 32, 32))
    assert shipped.shape == (20, 1, 32, 32) and shipped.dtype == np.float32
    cases = {"wrong_shape": {"x": x[:, :, :16]}, "no_keys": {"y": x}, "ints": {"x": x.astype(np.int32)},
             "nan": {"x": np.where(x > 1, np.nan, x).astype(np.float32)}, "empty": {"x": x[:0]}}
    matches = {"wrong_shape": r"the model expects \[N, 1, 32, 32\]", "no_keys": "must hold 'x'",
               "ints": "must hold float", "nan": "NaN or Inf", "empty": "no samples"}
    for name, arrays in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(cli.CLIError, match=matches[name]):
            calib_cli.load_calib_inputs(str(tmp_path / f"{name}.npz"), 100, (1, 32, 32))


# ------------------------------------------------------------- tvmc run against a stand-in model
class _StandInModel:
    """A compiled model stand-in: logits = mean of the input per sample times a fixed matrix."""

    config = NPUConfig(clock_mhz=400.0)
    W = np.arange(10, dtype=np.float32)

    def __init__(self, path, trust=False):
        self.path, self.calls, self.trust = path, [], trust

    def run(self, inputs, mode="func"):
        self.calls.append(mode)
        x = inputs["input"]
        return x.reshape(x.shape[0], -1).mean(1, keepdims=True) * self.W

    def report(self):
        return {"layers": [{"name": "conv0", "device": "npu", "cycles": 800, "mac_utilisation": 0.25, "groups": 3},
                           {"name": "fc", "device": "cpu"}]}


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    from target_npu.artifact import save_artifact

    path = save_artifact(tmp_path / "m.tar", config=_StandInModel.config,
                         meta={"target": "ioso_npu", "inputs": [{"name": "input", "shape": [2, 1, 4, 4],
                                                                 "dtype": "float32"}]})
    made = []

    class _API:
        @staticmethod
        def load(p, trust=False):
            made.append(_StandInModel(p, trust))
            return made[-1]

    monkeypatch.setattr(cli_run, "compile_api", lambda: _API)
    return path, made


def test_run_outputs_top_time_and_profile(stand_in, tmp_path, capsys):
    path, made = stand_in
    x = np.stack([np.full((1, 4, 4), 1.0), np.full((1, 4, 4), -1.0)]).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=x)
    argv = ["run", str(path), "--inputs", str(tmp_path / "in.npz"), "--outputs", str(tmp_path / "out.npz"),
            "--print-top", "2", "--print-time", "--repeat", "3", "--profile",
            "--profile-json", str(tmp_path / "p.json"), "--profile-plot", str(tmp_path / "p.png")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert made[0].calls == ["both"] * 3 and made[0].trust is False  # the default runs no code from the file
    assert cli.main(["run", str(path), "--trust-artifact"]) == 0 and made[1].trust is True
    with np.load(tmp_path / "out.npz", allow_pickle=False) as z:
        assert np.array_equal(z["output_0"], _StandInModel(None).run({"input": x}))
    assert "output_0[0] top-2: 9: 9, 8: 8" in out and "output_0[1] top-2: 0: -0, 1: -1" in out
    assert "Execution time summary" in out
    assert "conv0  NPU" in out and " 2.00 " in out  # 800 cycles at 400 MHz
    assert json.loads((tmp_path / "p.json").read_text()) == _StandInModel(None).report()
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_run_fill_and_errors(stand_in, tmp_path, capsys):
    path, made = stand_in
    assert cli.main(["run", str(path), "--fill-mode", "ones"]) == 0
    assert made[-1].calls == ["func"] and "output_0 float32[2, 10]" in capsys.readouterr().out
    rc, err = _err(capsys, ["run", str(path), "--profile-json", "p.json"])
    assert rc == 2 and "need --profile" in _assert_one_line(err)
    rc, err = _err(capsys, ["run", str(path), "--print-top", "0"])
    assert rc == 2 and "--print-top must be positive" in _assert_one_line(err)
    np.savez(tmp_path / "bad.npz", images=np.zeros(3))
    rc, err = _err(capsys, ["run", str(path), "--inputs", str(tmp_path / "bad.npz")])
    assert rc == 2 and "unknown input(s) ['images']" in _assert_one_line(err)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"junk" * 200)
    rc, err = _err(capsys, ["run", str(junk)])
    assert rc == 1 and "junk.tar is not a compiled-model .tar" in _assert_one_line(err)


def _tiny_onnx(tmp_path: Path, dims: list) -> Path:
    from onnx import TensorProto, helper, save

    g = helper.make_graph([helper.make_node("Relu", ["input"], ["output"])], "g",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, dims)])
    save(helper.make_model(g), str(tmp_path / "m.onnx"))
    return tmp_path / "m.onnx"


@pytest.mark.parametrize("shapes, match", [
    (None, r"model input 'input' has a dynamic shape \['N', 1, 32, 32\]; give --input-shapes \"input:\[1,1,32,32\]\""),
    ("image:[1,1,32,32]", r"unknown input\(s\) \['image'\]; the model's inputs are \['input'\]"),
    ("input:[1,32,32]", r"input 'input' has rank 4"),
])
def test_compile_checks_input_shapes_against_the_model(tmp_path, capsys, shapes, match):
    model = _tiny_onnx(tmp_path, ["N", 1, 32, 32])
    extra = [] if shapes is None else ["--input-shapes", shapes]
    rc, err = _err(capsys, ["compile", str(model), "--target=llvm", "-o", str(tmp_path / "m.tar"), *extra])
    assert rc == 2 and re.search(match, _assert_one_line(err))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    rc, err = _err(capsys, ["compile", str(bad), "--target=ioso_npu", "-o", str(tmp_path / "b.tar")])
    assert rc == 2 and "model file" in _assert_one_line(err) and "bad.onnx' is not a valid ONNX file" in err


@pytest.mark.parametrize("target, kind", [("ioso_npu", "ioso_npu"), ("ioso_npu, llvm", "ioso_npu"),
                                          ("llvm,ioso_npu -pe_arrays=1", "ioso_npu"), ("llvm", "llvm")])
def test_compile_passes_target_config_shapes_and_records(tmp_path, monkeypatch, capsys, target, kind):
    calls = {}

    class _Compiled:
        def offload_summary(self):
            return {"line": "1 of 1 layers (100.0 % of MACs) on the NPU"}

        def export(self, path):
            calls["export"] = Path(path)

    class _API:
        @staticmethod
        def compile(model, **kw):
            calls.update(model=model, **kw)
            return _Compiled()

    monkeypatch.setattr(cli, "compile_api", lambda: _API)
    model, records = _tiny_onnx(tmp_path, ["N", 1, 32, 32]), tmp_path / "r.json"
    records.write_text("")
    opts = ["--target-ioso_npu-clock_mhz=500"] if kind == "ioso_npu" else []
    argv = ["compile", str(model), f"--target={target}", "-o", str(tmp_path / "o.tar"), "--input-shapes",
            "input:[1,1,32,32]", "--tuning-records", str(records), *opts]
    assert cli.main(argv) == 0, capsys.readouterr().err
    expected_cfg = NPUConfig(clock_mhz=500.0, pe_arrays=1 if "pe_arrays" in target else 4) if opts else NPUConfig()
    assert calls == {"model": str(model), "target": kind, "input_shapes": {"input": (1, 1, 32, 32)},
                     "config": expected_cfg, "tuning_records": str(records), "export": tmp_path / "o.tar"}


# ------------------------------------------------- the real pipeline: tvmc compile + tvmc run
def _qdq_model(tmp_path: Path, seed: int, batch: int = 1):
    onnx = pytest.importorskip("onnx")
    from ioso_tvm.testing import QDQBuilder

    rng = np.random.default_rng(seed)
    b = QDQBuilder((batch, 16, 6, 6), rng)
    x = b.conv(b.input, 16)
    out = b.gap(b.add(x, b.conv(x, 16, act=None, signed_out=True)))
    path = tmp_path / f"m{seed}.onnx"
    onnx.save(b.model([out]), str(path))
    return b, out, path, rng


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tvmc_compile_run_is_bit_exact_with_the_contract(tmp_path, capsys, seed):
    pytest.importorskip("ioso_tvm.compiler")
    b, out, model, rng = _qdq_model(tmp_path, seed, batch=2)
    tar = tmp_path / "m.tar"
    assert cli.main(["compile", str(model), "--target=ioso_npu, llvm", "--input-shapes", "input:[2,16,6,6]",
                     "-o", str(tar)]) == 0, capsys.readouterr().err
    assert re.search(r"^(\d+) of \1 layers \(100\.0 % of MACs\) on the NPU$", capsys.readouterr().out, re.M)
    x = rng.standard_normal((2, 16, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=x)
    argv = ["run", str(tar), "--inputs", str(tmp_path / "in.npz"), "--outputs", str(tmp_path / "out.npz"),
            "--profile", "--profile-json", str(tmp_path / "p.json"), "--profile-plot", str(tmp_path / "p.png")]
    assert cli.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    with np.load(tmp_path / "out.npz", allow_pickle=False) as z:
        assert np.array_equal(z["output_0"], b.run_reference(x, [out])[0])
    report = json.loads((tmp_path / "p.json").read_text())
    convs = [lay for lay in report["layers"] if lay["kind"] == "conv"]
    assert len(convs) == 2 and all(lay["cycles"] > 0 for lay in convs)
    total = sum(lay["cycles"] for lay in report["layers"])
    total_row = [ln.split() for ln in printed.splitlines() if ln.startswith("total")]
    assert total_row and total_row[0][1] == str(total)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_tvmc_compile_errors_from_the_compiler_are_one_line(tmp_path, capsys):
    pytest.importorskip("ioso_tvm.compiler")
    _, _, model, _ = _qdq_model(tmp_path, 5)
    # a one-group NPU cannot run a model calibrated with three groups
    rc, err = _err(capsys, ["compile", str(model), "--target=ioso_npu", "--target-ioso_npu-isg_group_signs=0",
                            "-o", str(tmp_path / "m.tar")])
    assert rc == 1 and "isg_group_signs" in _assert_one_line(err)
    assert not (tmp_path / "m.tar").exists()


def test_tvmc_compile_prints_no_empty_scope_lines(tmp_path):
    """TVM logs one 'Scope Saving' line per constant when a VM-initialised executable is saved; the compiled
    model makes its VM only on the first run, so `tvmc compile` prints just its own lines (checked in a
    subprocess: the lines come from C++, past Python's capture)."""
    import subprocess
    import sys

    _, _, model, _ = _qdq_model(tmp_path, 7)
    tar = tmp_path / "m.tar"
    res = subprocess.run([sys.executable, "-m", "ioso_tvm.tvmc.cli", "compile", str(model), "--target=ioso_npu",
                          "-o", str(tar)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Scope" not in res.stdout + res.stderr and tar.is_file()
    assert res.stdout.splitlines()[0].startswith("compiled ")
