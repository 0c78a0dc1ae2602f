"""tvmc's upstream-style flags: --version, target option help, -O / --pass-config / --disabled-pass /
--desired-layout / --dump-code / llvm options, run -i/-o/--number/--repeat/--threads, the profile's CPU
rows, a torch-free `tvmc run`, and the ioso_tvm public API listing."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hw_model.config import NPUConfig
from ioso_tvm.tvmc import cli, cli_compile, cli_run

ROOT = Path(__file__).resolve().parents[1]


def _err(capsys, argv) -> tuple[int, str]:
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvmc: error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------ version and help
def test_version_names_project_and_tvm(capsys):
    from importlib import metadata

    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == (f"ioso_npu {metadata.version('ioso_npu')} (apache-tvm {metadata.version('apache-tvm')}, "
                   f"apache-tvm-ffi {metadata.version('apache-tvm-ffi')})")


def test_every_target_option_has_its_field_docstring_as_help():
    import ast
    import inspect

    docs = cli_compile.npu_field_docs()
    assert list(docs) == list(NPUConfig().to_dict())  # every field, in order
    # independent reading of the source: each field's docstring is the string right after it
    src = inspect.getsource(NPUConfig)
    for name, doc in docs.items():
        m = re.search(rf"^    {name}: [^\n]*\n    \"\"\"(.*?)\"\"\"", src, re.S | re.M)
        assert m and " ".join(m.group(1).split()) == doc, name
        assert ast.literal_eval(f'"""{m.group(1)}"""')
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    for cmd in ("compile", "tune"):
        helps = {a.option_strings[0]: a.help for a in sub[cmd]._actions if a.option_strings}
        for name, doc in docs.items():
            h = helps[f"--target-ioso_npu-{name}"]
            default = getattr(NPUConfig(), name)
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            assert h == f"{doc} (default {shown})".replace("%", "%%"), name
    assert subprocess.run([sys.executable, "-m", "ioso_tvm.tvmc.cli", "compile", "--help"], capture_output=True,
                          text=True, cwd=ROOT).stdout.count("Journal") >= 3


# ------------------------------------------------------------- refused flags: one line, why
@pytest.mark.parametrize("extra, match", [
    (["-O", "0"], r"-O/--opt-level 0 is not supported: TVM 0.27's Relax build .* only -O3"),
    (["--opt-level=2"], r"-O/--opt-level 2 is not supported"),
    (["--desired-layout", "NHWC"], r"--desired-layout does not apply to this target: the NPU's layout is fixed"),
    (["--target-llvm-mcpu=skylake"], r"'--target-llvm-mcpu' is not supported: the host part is built for the gen"),
    (["--disabled-pass", "ioso_npu.FoldQDQ"], r"--disabled-pass ioso_npu.FoldQDQ is not allowed: it turns the QDQ"),
    (["--disabled-pass", "FoldConstant,ioso_npu.PartitionForNPU"], r"PartitionForNPU is not allowed"),
    (["--pass-config", "no.such.key=1"], r"--pass-config: unknown key 'no.such.key'; valid: ioso_npu.memory_reuse"),
    (["--pass-config", "tirx.disable_assert=maybe"], r"tirx.disable_assert takes a boolean"),
    (["--pass-config", "relax.FuseOps.max_depth=x"], r"relax.FuseOps.max_depth takes an integer"),
    (["--pass-config", "tirx.UnrollLoop=1"], r"has type tirx.transform.UnrollLoopConfig, which the command line"),
    (["--pass-config", "novalue"], r"--pass-config must be KEY=VALUE"),
    (["--dump-code", "relax,bogus"], r"--dump-code: unknown format\(s\) \['bogus'\]; valid: relax, npu"),
    (["--threads", "0"], r"--threads: threads must be at least 1"),
])
def test_refused_compile_flags_are_one_line(capsys, tmp_path, extra, match):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    rc, err = _err(capsys, ["compile", str(model), "--target=ioso_npu", "-o", str(tmp_path / "m.tar"), *extra])
    assert rc == 2 and re.search(match, _one_line(err))
    assert not (tmp_path / "m.tar").exists()


def test_llvm_options_inline_and_npu_keys_on_llvm_refused(capsys, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    rc, err = _err(capsys, ["compile", str(model), "--target=ioso_npu, llvm -mcpu=skylake", "-o", "m.tar"])
    assert rc == 2 and "target 'llvm' takes no options here, got '-mcpu=skylake': the host part" in _one_line(err)
    rc, err = _err(capsys, ["compile", str(model), "--target=llvm", "--pass-config", "ioso_npu.offload=0"])
    assert rc == 2 and "ioso_npu.offload needs the ioso_npu target" in _one_line(err)


def test_pass_context_and_compile_options_reach_the_compile(tmp_path, monkeypatch, capsys):
    """-O3, TVM keys, disabled passes and the ioso_npu.* keys arrive where the compile reads them."""
    import tvm

    seen = {}

    class _Compiled:
        def offload_summary(self):
            return {"line": "1 of 1 layers (100.0 % of MACs) on the NPU"}

        def export(self, path):
            Path(path).write_bytes(b"tar")

    class _API:
        @staticmethod
        def compile(model, **kw):
            ctx = tvm.transform.PassContext.current()
            seen.update(kw=kw, config={k: bool(v) for k, v in ctx.config.items()},
                        disabled=[str(p) for p in ctx.disabled_pass], opt=int(ctx.opt_level))
            return _Compiled()

    monkeypatch.setattr(cli, "compile_api", lambda: _API)
    sys_model = tmp_path / "m.onnx"
    from test_cli import _tiny_onnx

    sys_model = _tiny_onnx(tmp_path, [1, 1, 4, 4])
    argv = ["compile", str(sys_model), "--target=ioso_npu", "-O3", "-o", str(tmp_path / "o.tar"),
            "--pass-config", "tirx.disable_assert=1,ioso_npu.memory_reuse=false", "--pass-config",
            "ioso_npu.permute_groups=0", "--disabled-pass", "FoldConstant", "--disabled-pass",
            "ioso_npu.PlanGroupPermutation"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert seen["config"] == {"tirx.disable_assert": True}
    assert seen["disabled"] == ["FoldConstant", "ioso_npu.PlanGroupPermutation"] and seen["opt"] == 3
    assert seen["kw"]["memory_reuse"] is False and seen["kw"]["permute_groups"] is False
    assert "offload" not in seen["kw"]


# ------------------------------------------------------------ real compiles: the flags act
def _isg_model(tmp_path: Path, seed: int):
    import onnx

    from ioso_tvm.testing import QDQBuilder

    rng = np.random.default_rng(seed)
    b = QDQBuilder((1, 48, 6, 6), rng)
    x = b.conv(b.conv(b.input, 48), 48)
    out = b.gap(b.conv(x, 32))
    path = tmp_path / f"isg{seed}.onnx"
    onnx.save(b.model([out]), str(path))
    return b, out, path, rng


@pytest.fixture(scope="module")
def compiled_pair(tmp_path_factory):
    """One ISG model compiled twice by tvmc: default with every dump, and with the permutation planner
    disabled, host asserts off (TVM pass config) and the asm dump."""
    pytest.importorskip("ioso_tvm.compiler")
    tmp = tmp_path_factory.mktemp("flags")
    b, out, model, rng = _isg_model(tmp, 0)
    base = ["compile", str(model), "--target=ioso_npu", "--input-shapes", "input:[1,48,6,6]"]
    assert cli.main([*base, "-o", str(tmp / "a.tar"), "--dump-code", ",".join(cli_compile.DUMP_FORMATS)]) == 0
    assert cli.main([*base, "-o", str(tmp / "b.tar"), "--dump-code", "asm", "--disabled-pass",
                     "ioso_npu.PlanGroupPermutation", "--pass-config", "tirx.disable_assert=1"]) == 0
    return tmp, b, out, rng


def test_dump_code_writes_every_format(compiled_pair):
    tmp = compiled_pair[0]
    text = {f: (tmp / f"a.tar.{f}").read_text() for f in cli_compile.DUMP_FORMATS}
    assert "R.call_dps_packed" in text["relax"] and ".npu.r0" in text["relax"]
    assert text["npu"].startswith("# region ") and "## section conv1" in text["npu"] and "Load(" in text["npu"]
    assert "@main" in text["vm"] and "call" in text["vm"]
    assert ".text" in text["asm"] or "ret" in text["asm"]
    assert "define" in text["ll"]
    assert text["tir"].count("# layer conv") == 3 and "T.prim_func" in text["tir"]


def test_disabled_pass_and_pass_config_act(compiled_pair):
    tmp, b, out, rng = compiled_pair
    from target_npu.artifact import load_artifact

    rep_a, rep_b = load_artifact(tmp / "a.tar").report, load_artifact(tmp / "b.tar").report
    # without the planner no producer is permuted: more explicit reorders, more cycles
    assert rep_a["permutes"]["permuted_tensors"] > 0 and rep_b["permutes"]["permuted_tensors"] == 0
    assert rep_b["explicit_permutes"] > rep_a["explicit_permutes"]
    assert rep_b["total_cycles"] > rep_a["total_cycles"]
    # tirx.disable_assert drops the host kernels' argument checks
    assert len((tmp / "b.tar.asm").read_text()) < 0.8 * len((tmp / "a.tar.asm").read_text())
    # both still compute the contract, bit for bit
    x = rng.standard_normal((1, 48, 6, 6)).astype(np.float32)
    np.savez(tmp / "in.npz", input=x)
    for name in ("a", "b"):
        assert cli.main(["run", str(tmp / f"{name}.tar"), "-i", str(tmp / "in.npz"), "-o",
                         str(tmp / f"{name}.npz")]) == 0
        with np.load(tmp / f"{name}.npz") as z:
            assert np.array_equal(z["output_0"], b.run_reference(x, [out])[0])


def test_offload_off_by_pass_config(tmp_path, capsys):
    pytest.importorskip("ioso_tvm.compiler")
    import onnx

    from ioso_tvm.testing import QDQBuilder

    bld = QDQBuilder((1, 16, 4, 4), np.random.default_rng(3))
    out = bld.gap(bld.conv(bld.input, 16))
    onnx.save(bld.model([out]), str(tmp_path / "m.onnx"))
    argv = ["compile", str(tmp_path / "m.onnx"), "--target=ioso_npu", "-o", str(tmp_path / "m.tar"),
            "--pass-config", "ioso_npu.offload=0", "--dump-code", "npu"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "m.tar.npu").read_text() == "# no NPU region\n"


# ---------------------------------------------------------------------------------- run
class _Model:
    def __init__(self):
        self.calls = 0

    def run(self, inputs, mode="func"):
        self.calls += 1
        return inputs["input"].sum(axis=(1, 2, 3))[:, None] * np.arange(3, dtype=np.float32)

    def report(self):
        return {"layers": [{"name": "conv0", "device": "npu", "cycles": 400, "mac_utilisation": 0.5},
                           {"name": "sig1", "device": "cpu", "cycles": 0, "cpu_reason": "sigmoid: no NPU activation"}],
                "fallbacks": [{"tensor": "t7", "op": "qdq", "reason": "float Softmax between QDQ pairs"},
                              {"tensor": "s1", "op": "sig1", "reason": "sigmoid: no NPU activation"}]}


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    from target_npu.artifact import save_artifact

    path = save_artifact(tmp_path / "m.tar", config=NPUConfig(clock_mhz=400.0),
                         meta={"target": "ioso_npu", "inputs": [{"name": "input", "shape": [2, 1, 2, 2],
                                                                 "dtype": "float32"}]})
    made = []

    class _API:
        @staticmethod
        def load(p, trust=False):
            made.append(_Model())
            return made[-1]

    monkeypatch.setattr(cli_run, "compile_api", lambda: _API)
    return path, made


@pytest.mark.parametrize("number, repeat", [(1, 1), (3, 2), (2, 5)])
def test_run_short_flags_number_repeat(stand_in, tmp_path, capsys, number, repeat):
    path, made = stand_in
    x = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)
    np.savez(tmp_path / "in.npz", input=x)
    argv = ["run", str(path), "-i", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz"), "--print-time",
            "--number", str(number), "--repeat", str(repeat)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert made[-1].calls == number * repeat  # upstream: repeat measurements of number runs each
    with np.load(tmp_path / "out.npz") as z:
        assert np.array_equal(z["output_0"], _Model().run({"input": x}))
    out = capsys.readouterr().out
    assert "Execution time summary" in out
    rc, err = _err(capsys, ["run", str(path), "--number", "0"])
    assert rc == 2 and "--number must be positive, got 0" in _one_line(err)


def test_run_threads_and_profile_lists_cpu_layers(stand_in, monkeypatch, capsys):
    path, _ = stand_in
    import target_npu.threads as threads

    got = []
    monkeypatch.setattr(threads, "set_threads", lambda n=None: got.append(n) or (n or threads.DEFAULT_THREADS))
    assert cli.main(["run", str(path), "--threads", "3", "--profile"]) == 0
    out = capsys.readouterr().out
    assert got == [3] and "threads: 3" in out
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert rows["conv0"].split()[1] == "NPU"
    assert rows["sig1"].split()[1] == "CPU" and "sigmoid: no NPU activation" in rows["sig1"]
    assert rows["t7"].split()[1:3] == ["(qdq)", "CPU"] and "float Softmax" in rows["t7"]
    assert sum(1 for ln in out.splitlines() if "sigmoid" in ln) == 1  # a CPU layer is not listed twice
    assert cli.main(["run", str(path)]) == 0 and got[-1] is None  # default: set_threads' measured default


def test_compile_and_tune_set_threads(tmp_path, monkeypatch, capsys):
    import target_npu.threads as threads

    got = []
    monkeypatch.setattr(threads, "set_threads", lambda n=None: got.append(n) or 1)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    cli.main(["compile", str(model), "--target=ioso_npu", "--threads", "2", "-o", str(tmp_path / "m.tar")])
    cli.main(["tune", str(model), "--target=ioso_npu", "--threads", "4", "-o", str(tmp_path / "r.json")])
    assert got == [2, 4]
    capsys.readouterr()


def test_tvmc_run_imports_neither_torch_nor_calibration(compiled_pair):
    tmp = compiled_pair[0]
    code = ("import sys, json\nfrom ioso_tvm.tvmc import cli\nrc = cli.main(['run', sys.argv[1], '--profile'])\n"
            "print(json.dumps([rc, sorted(m for m in sys.modules if m.split('.')[0] == 'torch' "
            "or m.startswith('ioso_tvm.calib'))]))")
    res = subprocess.run([sys.executable, "-c", code, str(tmp / "a.tar")], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    rc, mods = json.loads(res.stdout.strip().splitlines()[-1])
    assert rc == 0 and mods == [], (mods, res.stderr[-2000:])
    assert "conv1" in res.stdout


def test_without_torch_restores_the_import():
    if "torch" in sys.modules:
        with cli_run.without_torch():
            assert sys.modules["torch"] is not None  # already loaded: nothing changes
        return
    with cli_run.without_torch():
        with pytest.raises(ImportError):
            import torch  # noqa: F401
    assert "torch" not in sys.modules


# ------------------------------------------------------------------- the ioso_tvm API listing
def test_ioso_tvm_lists_its_api_and_stays_light():
    code = ("import sys, pydoc, json\nimport ioso_tvm\nnames = dir(ioso_tvm)\n"
            "light = not any(m in sys.modules for m in ('torch', 'tvm', 'ioso_tvm.calib'))\n"
            "text = pydoc.render_doc(ioso_tvm, renderer=pydoc.plaintext)\n"
            "fns = text.split('FUNCTIONS')[1].split('DATA')[0] if 'FUNCTIONS' in text else ''\n"
            "print(json.dumps([names, light, fns]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    names, light, fns = json.loads(res.stdout.strip().splitlines()[-1])
    import ioso_tvm

    assert set(ioso_tvm.__all__) <= set(names) and {"calibrate", "compile", "export_onnx", "load"} <= set(names)
    assert light  # import ioso_tvm alone loads neither torch nor TVM
    for name in ("calibrate(", "compile(", "export_onnx(", "load("):
        assert name in fns, fns[:500]


def test_run_profile_trace_writes_a_chrome_trace(compiled_pair, capsys):
    tmp = compiled_pair[0]
    from target_npu.artifact import load_artifact

    trace = tmp / "t.json"
    assert cli.main(["run", str(tmp / "a.tar"), "--profile", "--trace", str(trace)]) == 0
    assert f"trace -> {trace}" in capsys.readouterr().out
    events = json.loads(trace.read_text())["traceEvents"]
    instr = [e for e in events if e["ph"] == "X" and e["cat"] != "layer"]
    report = load_artifact(tmp / "a.tar").report
    assert len(instr) == report["stream_instructions"] > 0  # one event per instruction of every stream
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in instr)
    layers = [e["name"] for e in events if e["ph"] == "X" and e["cat"] == "layer"]
    assert {"conv1", "conv2", "conv3"} <= set(layers)
    rc, err = _err(capsys, ["run", str(tmp / "a.tar"), "--trace", str(trace)])
    assert rc == 2 and "--trace need --profile" in _one_line(err)
    rc, err = _err(capsys, ["run", str(tmp / "a.tar"), "--profile", "--trace", str(tmp / "t.txt")])
    assert rc == 2 and "--trace must name a .json file" in _one_line(err)
