"""Bad files, flags and tensors a user hands to the command lines and to ``calibrate``, table-driven.

``OUTPUTS`` (no command destroys an input): an output equal to an input, in a missing folder, a
directory or of the wrong kind is refused in one line before any work starts; the inputs stay
byte-identical. ``ATOMIC``: writes go through a temporary file and a rename. ``JUNK`` (bounded
output): corrupt, huge or deeply nested records give one summary warning. ``TUNE_SHAPES``:
``tvmc tune --input-shapes`` is honoured. ``CALIB_ERRORS`` / ``CALIB_HANDLED``: calibration input
errors name the cause, or the input is handled (DataLoader, lists, train mode), seeded-reproducibly.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_calib_helpers import TinyRes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hw_model.config import NPUConfig
from ioso_tvm import cli as calib_cli
from ioso_tvm.calib import CalibConfig, CalibrationWarning, calibrate
from ioso_tvm.testing import QDQBuilder
from ioso_tvm.tvmc import cli, cli_run
from ioso_tvm.tvmc.cli_common import atomic_path, write_atomic
from target_npu.tuner import shape_spec
from target_npu.tuner.records import TuningRecordWarning, best_tiling, load_records, make_record, save_records
from target_npu.tuner.tune import conv_specs, tune_model, with_input_shapes


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line(err: str, prog: str = "tvmc") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    return lines[0]


def _qdq_onnx(path: Path, batch: int | str = 1) -> Path:
    b = QDQBuilder((1, 16, 5, 5), np.random.default_rng(0))
    m = b.model([b.conv(b.input, 16)])
    if batch != 1:
        dim = m.graph.input[0].type.tensor_type.shape.dim[0]
        if isinstance(batch, str):
            dim.dim_param = batch
        else:
            dim.dim_value = batch
    onnx.save(m, str(path))
    return path


class _StandIn:
    """A compiled model stand-in for ``tvmc run``: logits = mean of the input times 0..9."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def run(self, inputs, mode="func"):
        self.calls.append(mode)
        x = inputs["input"]
        return x.reshape(x.shape[0], -1).mean(1, keepdims=True) * np.arange(10, dtype=np.float32)

    def report(self):
        return {"layers": [{"name": "conv0", "device": "npu", "cycles": 800}]}


class _Folder(type(Path())):  # type: ignore[misc]
    """The test folder, with ``started``: the entry points that were called."""

    started: list[str]


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A folder with every kind of input, the compile / load / tune / calibrate entry points replaced by
    recorders (``ws.started`` lists what started), and cwd in the folder."""
    from target_npu.artifact import save_artifact

    monkeypatch.chdir(tmp_path)
    started: list[str] = []
    _qdq_onnx(tmp_path / "m.onnx")
    save_artifact(tmp_path / "m.tar", config=NPUConfig(clock_mhz=400.0),
                  meta={"target": "ioso_npu", "inputs": [{"name": "input", "shape": [2, 1, 4, 4], "dtype": "float32"}]})
    np.savez(tmp_path / "in.npz", input=np.ones((2, 1, 4, 4), np.float32))
    np.savez(tmp_path / "data.npz", x=np.zeros((4, 1, 32, 32), np.float32))
    (tmp_path / "recs.tar").write_text("")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir.tar").mkdir()
    (tmp_path / "adir.onnx").mkdir()
    (tmp_path / "afile.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path / "m.onnx", tmp_path / "alias.tar")
    os.symlink(tmp_path / "m.onnx", tmp_path / "link.onnx")
    os.symlink(tmp_path / "m.tar", tmp_path / "plot.png")
    os.symlink(tmp_path / "data.npz", tmp_path / "data_link.onnx")
    os.link(tmp_path / "m.onnx", tmp_path / "hard.onnx")

    class _API:
        @staticmethod
        def compile(*a, **k):
            started.append("compile")
            raise AssertionError("compile must not start")

        @staticmethod
        def load(p, trust=False):
            started.append("load")
            return _StandIn()

    monkeypatch.setattr(cli, "compile_api", lambda: _API)
    monkeypatch.setattr(cli_run, "compile_api", lambda: _API)
    import ioso_tvm
    import target_npu.tuner

    monkeypatch.setattr(target_npu.tuner, "tune_model", lambda *a, **k: started.append("tune"))
    monkeypatch.setattr(ioso_tvm, "calibrate", lambda *a, **k: started.append("calibrate"))
    folder = _Folder(tmp_path)
    folder.started = started
    return folder


# ------------------------------------------------------------- 2. no command destroys an input
RUN = ["run", "m.tar"]
TUNE = ["tune", "m.onnx", "--target=ioso_npu", "--trials", "2"]
COMPILE = ["compile", "m.onnx", "--target=ioso_npu"]
CALIB = ["--model", "resnet20", "--method", "rtn", "--num-samples", "4"]
OUTPUTS = [  # id, main, argv, error pattern
    ("compile -o the model", cli.main, [*COMPILE, "-o", "m.onnx"],
     r"-o/--output 'm.onnx' is the same file as the model file 'm.onnx'; write the output to another file"),
    ("compile -o symlink to the model", cli.main, [*COMPILE, "-o", "alias.tar"],
     r"-o/--output 'alias.tar' is the same file as the model file 'm.onnx'"),
    ("compile -o the model by a relative path", cli.main, [*COMPILE, "-o", "sub/../m.onnx"],
     r"'sub/../m.onnx' is the same file as the model file"),
    ("compile -o the tuning records", cli.main, [*COMPILE, "--tuning-records", "recs.tar", "-o", "./recs.tar"],
     r"'./recs.tar' is the same file as the tuning records file 'recs.tar'"),
    ("compile -o in a missing folder", cli.main, [*COMPILE, "-o", "nope/o.tar"],
     r"-o/--output 'nope/o.tar': the folder 'nope' does not exist"),
    ("compile -o under a file", cli.main, [*COMPILE, "-o", "afile.txt/o.tar"],
     r"the folder 'afile.txt' does not exist"),
    ("compile -o a directory", cli.main, [*COMPILE, "-o", "adir.tar"], r"-o/--output 'adir.tar' is a directory"),
    ("compile -o not a .tar", cli.main, [*COMPILE, "-o", "o.txt"], r"-o/--output must name a \.tar file"),
    ("tune -o the model", cli.main, [*TUNE, "-o", "m.onnx"],
     r"-o/--output 'm.onnx' is the same file as the model file 'm.onnx'"),
    ("tune -o symlink to the model", cli.main, [*TUNE, "-o", "link.onnx"], r"'link.onnx' is the same file as"),
    ("tune -o hard link to the model", cli.main, [*TUNE, "-o", "hard.onnx"], r"'hard.onnx' is the same file as"),
    ("tune -o absolute path of the model", cli.main, [*TUNE, "-o", "{tmp}/m.onnx"], r"is the same file as the model"),
    ("tune -o in a missing folder", cli.main, [*TUNE, "-o", "nope/r.jsonl"], r"the folder 'nope' does not exist"),
    ("tune -o a directory", cli.main, [*TUNE, "-o", "adir"], r"-o/--output 'adir' is a directory"),
    ("run --profile-json the artifact", cli.main, [*RUN, "--profile", "--profile-json", "m.tar"],
     r"--profile-json 'm.tar' is the same file as the compiled model 'm.tar'"),
    ("run --outputs the artifact", cli.main, [*RUN, "--outputs", "./m.tar"],
     r"--outputs './m.tar' is the same file as the compiled model"),
    ("run --outputs the --inputs", cli.main, [*RUN, "--inputs", "in.npz", "--outputs", "in.npz"],
     r"--outputs 'in.npz' is the same file as the --inputs file 'in.npz'"),
    ("run --profile-plot symlink to the artifact", cli.main, [*RUN, "--profile", "--profile-plot", "plot.png"],
     r"--profile-plot 'plot.png' is the same file as the compiled model"),
    ("run two outputs to one file", cli.main, [*RUN, "--outputs", "o.npz", "--profile", "--profile-json", "o.npz"],
     r"--profile-json 'o.npz' is the same file as the --outputs output 'o.npz'"),
    ("run --profile-plot of an unknown format", cli.main, [*RUN, "--profile", "--profile-plot", "p.txt"],
     r"--profile-plot must name a \.png or \.svg or \.pdf file"),
    ("run --outputs in a missing folder", cli.main, [*RUN, "--outputs", "nope/o.npz"], r"folder 'nope' does not exist"),
    ("run --profile-json a directory", cli.main, [*RUN, "--profile", "--profile-json", "adir"], r"is a directory"),
    ("calibrate -o symlink to the --data file", calib_cli.main, [*CALIB, "--data", "data.npz", "-o", "data_link.onnx"],
     r"-o/--output 'data_link.onnx' is the same file as the --data file 'data.npz'"),
    ("calibrate -o in a missing folder", calib_cli.main, [*CALIB, "-o", "nope/q.onnx"],
     r"-o/--output 'nope/q.onnx': the folder 'nope' does not exist"),
    ("calibrate -o a directory", calib_cli.main, [*CALIB, "-o", "adir.onnx"], r"'adir.onnx' is a directory"),
    ("calibrate --resume a file", calib_cli.main, [*CALIB, "--resume", "afile.txt", "-o", "q.onnx"],
     r"--resume 'afile.txt' is not a folder"),
]


@pytest.mark.parametrize("main, argv, pattern", [c[1:] for c in OUTPUTS], ids=[c[0] for c in OUTPUTS])
def test_output_paths_are_checked_before_anything_starts(ws, capsys, main, argv, pattern):
    before = {p.name: _digest(p) for p in ws.iterdir() if p.is_file()}
    rc = main([a.replace("{tmp}", str(ws)) for a in argv])
    prog = "tvmc" if main is cli.main else "ioso-calibrate"
    assert rc == 2 and re.search(pattern, _one_line(capsys.readouterr().err, prog))
    assert ws.started == []  # refused before the compile / load / tune / calibration started
    assert {p.name: _digest(p) for p in ws.iterdir() if p.is_file()} == before  # every input byte-identical
    assert not [p for p in ws.iterdir() if ".tmp" in p.name]


def _fail_midway(n: int):
    for i in range(n):
        yield make_record(shape_spec(16, 16, 8, 8), *_a_tiling(), 10 + i, NPUConfig(), "t")
    raise RuntimeError("tuner crashed")


def _a_tiling():
    from target_npu.tuner import default_tiling

    return (default_tiling(shape_spec(16, 16, 8, 8), NPUConfig()),)


def _atomic_save_fails(tmp, append):
    path = tmp / "r.jsonl"
    path.write_text('{"old": 1}\n')
    with pytest.raises(RuntimeError, match="tuner crashed"):
        save_records(path, _fail_midway(3), append=append)
    return path, '{"old": 1}\n'


def _atomic_path_fails(tmp, _):
    path = tmp / "p.json"
    path.write_text("old")
    with pytest.raises(ZeroDivisionError), atomic_path(path) as t:
        t.write_text("half")
        1 / 0  # noqa: B018
    return path, "old"


def _run_outputs_exact_name(tmp, _):
    path = tmp / "out"  # no .npz suffix: written under exactly this name (np.savez would add .npz)
    path.write_text("old")
    assert cli.main(["run", "m.tar", "--fill-mode", "ones", "--outputs", "out"]) == 0
    with np.load(path, allow_pickle=False) as z:
        assert z["output_0"].shape == (2, 10)
    assert not (tmp / "out.npz").exists()
    return path, None


def _calibrate_replaces_output(tmp, monkeypatch):
    import ioso_tvm

    small = onnx.load(str(tmp / "m.onnx"))
    monkeypatch.setattr(ioso_tvm, "export_onnx", lambda q, path, input_shape=None: small)
    monkeypatch.setattr(ioso_tvm, "calibrate", lambda *a, **k: "qmodel")
    path = tmp / "q.onnx"
    path.write_text("old")
    os.chmod(path, 0o640)
    assert calib_cli.main([*CALIB, "-o", "q.onnx"]) == 0
    assert onnx.load(str(path)) == small and (path.stat().st_mode & 0o777) == 0o640  # the mode is kept
    return path, None


def _tune_model_refuses_its_model(tmp, _):
    with pytest.raises(ValueError, match=r"output '.*m.onnx' is the model file"):
        tune_model(str(tmp / "link.onnx"), trials=1, output=tmp / "m.onnx", progress=False)
    return tmp / "m.onnx", None


ATOMIC = [  # id, action(tmp, arg) -> (path, expected text or None)
    ("save_records replace fails midway: old file kept", _atomic_save_fails, False),
    ("save_records append fails midway: old file kept", _atomic_save_fails, True),
    ("atomic_path block fails: old file kept", _atomic_path_fails, None),
    ("tvmc run --outputs writes the exact name", _run_outputs_exact_name, None),
    ("ioso-calibrate -o replaces atomically, mode kept", _calibrate_replaces_output, "monkeypatch"),
    ("tune_model API refuses output == model", _tune_model_refuses_its_model, None),
]


@pytest.mark.parametrize("action, arg", [c[1:] for c in ATOMIC], ids=[c[0] for c in ATOMIC])
def test_writes_are_atomic(ws, monkeypatch, capsys, action, arg):
    before = _digest(ws / "m.onnx")
    path, text = action(ws, monkeypatch if arg == "monkeypatch" else arg)
    if text is not None:
        assert path.read_text() == text
    assert _digest(ws / "m.onnx") == before
    assert not [p for p in ws.iterdir() if ".tmp" in p.name], sorted(p.name for p in ws.iterdir())


def test_save_records_appends_and_replaces(tmp_path):
    spec, cfg = shape_spec(16, 16, 8, 8), NPUConfig()
    recs = [make_record(spec, *_a_tiling(), c, cfg, "t") for c in (5, 7)]
    path = save_records(tmp_path / "r.jsonl", recs[:1], append=False)
    save_records(path, recs[1:])
    assert [r["cycles"] for r in load_records(path)] == [5, 7]
    save_records(path, recs[1:], append=False)
    assert [r["cycles"] for r in load_records(path)] == [7]
    write_atomic(tmp_path / "t.txt", "new")
    assert (tmp_path / "t.txt").read_text() == "new"


# ---------------------------------------------------------------------- 6. bounded output under junk
SPEC, CFG = shape_spec(16, 16, 8, 8), NPUConfig()


def _good_line(cycles: int = 10, cfg: NPUConfig = CFG) -> str:
    return json.dumps(make_record(SPEC, *_a_tiling(), cycles, cfg, "t"))


JUNK = [  # id, file content, expected good records, warnings, first-warning pattern
    ("a million corrupt lines", "x\n" * 1_000_000, 0, 1,
     r"r.jsonl: 1000000 bad records ignored; the first, .*r.jsonl:1: not a JSON object \(the line starts with 'x'\)"),
    ("eleven bad lines: one summary", "{\n" * 11, 0, 1, r"11 bad records ignored; the first, .*r.jsonl:1: corrupt"),
    ("ten bad lines: one warning each", "{\n" * 10, 0, 10, r"tuning record .*r.jsonl:1 ignored: corrupt JSON"),
    ("good lines first: the first bad line is named", _good_line() + "\n" + _good_line(9) + "\n" + "[]\n" * 20, 2, 1,
     r"20 bad records ignored; the first, .*r.jsonl:3: not a JSON object \(the line starts with '\['\)"),
    ("deeply nested line", '{"a": ' * 100_000 + "\n" + _good_line() + "\n", 1, 1,
     r"r.jsonl:1 ignored: JSON nested too deeply"),
    ("deeply nested array line", "[" * 100_000 + "\n", 0, 1, r"r.jsonl:1 ignored: not a JSON object .*'\['"),
    ("deeply nested config inside a record", re.sub(r'"nbuf": \d', '"nbuf": ' + "[" * 5000 + "]" * 5000, _good_line())
     + "\n", 0, 1, r"r.jsonl:1 ignored: JSON nested too deeply"),
    ("a 2 MiB line", '{"a": "' + "x" * (2 << 20) + '"}\n' + _good_line() + "\n", 1, 1,
     r"r.jsonl:1 ignored: line of 2097162 bytes, longer than 1048576"),
    ("bytes that are not UTF-8", '{"a": "\udcff\udcfe"}\n', 0, 1, r"r.jsonl:1 ignored: not UTF-8 text"),
    ("100000 lines of another version", '{"version": 1}\n' * 100_000, 0, 1,
     r"100000 bad records ignored; the first, .*r.jsonl:1: version 1, this tuner reads version 2"),
    ("a huge bad value is cut short", json.dumps({**json.loads(_good_line()), "cycles": "9" * 5000}) + "\n", 0, 1,
     r"cycles must be a positive int, got '9{100,}\.\.\. \(\d+ characters\)$"),
]


@pytest.mark.parametrize("text, good, count, pattern", [c[1:] for c in JUNK], ids=[c[0] for c in JUNK])
def test_junk_records_give_bounded_warnings(tmp_path, text, good, count, pattern):
    path = tmp_path / "r.jsonl"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs = load_records(path)
    msgs = [str(w.message) for w in caught if issubclass(w.category, TuningRecordWarning)]
    assert len(recs) == good and len(msgs) == count, msgs[:3]
    assert re.search(pattern, msgs[0]), msgs[0]


def _deep_record(depth: int) -> dict:
    """A record built in Python whose tiling field is a list nested ``depth`` deep (its repr recurses)."""
    deep: list = []
    for _ in range(depth):
        deep = [deep]
    rec = json.loads(_good_line())
    rec["config"]["ob_tile"] = deep
    return rec


BEST_JUNK = [  # id, records, warnings, pattern
    ("30 records of another NPUConfig: one summary", [_good_line(c, CFG.replace(pe_arrays=2)) for c in range(1, 31)], 1,
     r"tuning records of layer conv2d_n1_c16_h8_w8_k16.*: 30 bad records ignored; the first, .*:1: made for another"),
    ("a Python record nested 100000 deep", [_deep_record(100_000)], 1, r"record #0 ignored: nested too deeply"),
]


@pytest.mark.parametrize("lines, count, pattern", [c[1:] for c in BEST_JUNK], ids=[c[0] for c in BEST_JUNK])
def test_best_tiling_warnings_are_bounded(tmp_path, lines, count, pattern):
    source = lines
    if isinstance(lines[0], str):
        source = tmp_path / "r.jsonl"
        source.write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert best_tiling(source, SPEC, CFG) is None
    msgs = [str(w.message) for w in caught if issubclass(w.category, TuningRecordWarning)]
    assert len(msgs) == count and re.search(pattern, msgs[0]), msgs


@pytest.mark.parametrize("records, pattern", [
    ('{"a": [' * 50_000 + "\n" + "x\n" * 100_000,
     r"100001 bad records ignored; the first, .*:1: JSON nested too deeply"),
    ('{"version": 2, "config": ' * 3000 + "\n", r"rec.jsonl:1 ignored: JSON nested too deeply"),
], ids=["nested and junk records", "nested record objects"])
def test_junk_records_do_not_abort_a_compile(tmp_path, capsys, records, pattern):
    model = _qdq_onnx(tmp_path / "m.onnx")
    (tmp_path / "rec.jsonl").write_text(records)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = cli.main(["compile", str(model), "--target=ioso_npu", "-o", str(tmp_path / "m.tar"),
                       "--tuning-records", str(tmp_path / "rec.jsonl")])
    assert rc == 0, capsys.readouterr().err
    msgs = [str(w.message) for w in caught if issubclass(w.category, TuningRecordWarning)]
    assert len(msgs) == 1 and re.search(pattern, msgs[0]), msgs
    assert (tmp_path / "m.tar").is_file()


def test_meta_inputs_of_a_foreign_artifact_are_one_line(tmp_path, capsys, monkeypatch):
    from target_npu.artifact import save_artifact

    path = save_artifact(tmp_path / "m.tar", config=NPUConfig(),
                         meta={"inputs": [{"name": "input", "shape": [2, -1], "dtype": "float32"}]})
    api = type("A", (), {"load": staticmethod(lambda p, trust=False: _StandIn())})
    monkeypatch.setattr(cli_run, "compile_api", lambda: api)
    rc = cli.main(["run", str(path)])
    assert rc == 2 and re.search(r"meta.json inputs\[0\] is not a \(name, shape, dtype\) entry \(dims must be positive",
                                 _one_line(capsys.readouterr().err))


TUNE_SHAPES = [  # id, model batch, --input-shapes, rc, pattern (stderr) or expected layer-key batch
    ("dynamic batch tuned with the given shape", "N", "input:[2,16,5,5]", 0, "n2"),
    ("static batch overridden", 1, "input:[3,16,5,5]", 0, "n3"),
    ("dynamic batch without --input-shapes", "N", None, 2,
     r"model input 'input' has a dynamic shape \['N', 16, 5, 5\]; give --input-shapes \"input:\[1,16,5,5\]\""),
    ("unknown input name", "N", "image:[2,16,5,5]", 2, r"--input-shapes names unknown input\(s\) \['image'\]"),
    ("wrong rank", "N", "input:[2,16,5]", 2, r"--input-shapes: input 'input' has rank 4"),
    ("non-positive dim", "N", "input:[0,16,5,5]", 2, r"dims of 'input' must be positive integers"),
]


@pytest.mark.parametrize("batch, shapes, rc, expect", [c[1:] for c in TUNE_SHAPES], ids=[c[0] for c in TUNE_SHAPES])
def test_tune_honours_input_shapes(tmp_path, capsys, batch, shapes, rc, expect):
    model = _qdq_onnx(tmp_path / "m.onnx", batch)
    out = tmp_path / "r.jsonl"
    argv = ["tune", str(model), "--target=ioso_npu", "--trials", "2", "--tuner", "random", "--executor", "serial",
            "-o", str(out)]
    got = cli.main(argv + ([] if shapes is None else ["--input-shapes", shapes]))
    err = capsys.readouterr().err
    assert got == rc, err
    if rc:
        assert re.search(expect, _one_line(err)) and not out.exists()
        return
    keys = {json.loads(ln)["layer_key"] for ln in out.read_text().splitlines()}
    assert keys and all(k.startswith(f"conv2d_{expect}_c16_h5_w5_k16") for k in keys), keys


def test_conv_specs_input_shapes_api(tmp_path):
    model = onnx.load(str(_qdq_onnx(tmp_path / "m.onnx", "N")))
    assert [s.n for s in conv_specs(model, input_shapes={"input": (4, 16, 5, 5)})] == [4]
    with pytest.raises(ValueError, match=r"unknown input 'x'"):
        with_input_shapes(model, {"x": (1, 16, 5, 5)})
    with pytest.raises(ValueError, match=r"input_shapes\['input'\] must be 4 positive ints"):
        with_input_shapes(model, {"input": (1, 16)})


# ------------------------------------------------------------ 7. calibration input errors name the cause
SMALL = dict(num_samples=32, batch_size=8, iters=2, act_iters=2, progress=False, act_init_samples=32)


def _x(n: int = 32) -> torch.Tensor:
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(0))


class _Twice(nn.Module):
    """A net that calls one module twice in ``forward``."""

    def __init__(self, which: str) -> None:
        super().__init__()
        self.which = which
        self.c0, self.conv = nn.Conv2d(1, 4, 3, 1, 1), nn.Conv2d(4, 4, 3, 1, 1)
        self.gap, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 4)

    def forward(self, x):
        x = self.conv(self.conv(self.c0(x))) if self.which == "conv" else self.conv(self.c0(x))
        x = torch.flatten(self.gap(x), 1)
        return self.fc(self.fc(x)) if self.which == "fc" else self.fc(x)


CALIB_ERRORS = [  # id, model, data, exception, pattern
    ("conv module called twice", _Twice("conv"), _x(), ValueError,
     r"^module 'conv' \(Conv2d\) is called more than once in forward; .*self\.conv_2 = copy\.deepcopy\(self\.conv\)"),
    ("linear module called twice", _Twice("fc"), _x(), ValueError, r"^module 'fc' \(Linear\) is called more than once"),
    ("uint8 images", TinyRes(), (_x() * 50 + 128).clamp(0, 255).to(torch.uint8), TypeError,
     r"^calib_data has dtype torch.uint8, not float model inputs: .*ioso_tvm\.datasets\.to_model_input\(images\)"),
    ("uint8 numpy images", TinyRes(), np.zeros((32, 1, 12, 12), np.uint8), TypeError, r"dtype torch.uint8, not float"),
    ("int64 tensor", TinyRes(), torch.zeros(32, 1, 12, 12, dtype=torch.int64), TypeError, r"dtype torch.int64, not"),
    ("bool tensor", TinyRes(), torch.zeros(32, 1, 12, 12, dtype=torch.bool), TypeError, r"dtype torch.bool, not"),
    ("list of uint8 batches", TinyRes(), [torch.zeros(8, 1, 12, 12, dtype=torch.uint8)] * 4, TypeError,
     r"dtype torch.uint8, not float"),
    ("DataLoader of dicts", TinyRes(), DataLoader([{"image": torch.zeros(1, 12, 12)}] * 8, batch_size=4), TypeError,
     r"calib_data item 0 is a dict of keys \['image'\]; calib_data must be .*DataLoader"),
    ("empty list", TinyRes(), [], ValueError, r"calib_data \(list\) holds no samples"),
    ("batches of two shapes", TinyRes(), [torch.zeros(8, 1, 12, 12), torch.zeros(8, 1, 10, 10)], ValueError,
     r"calib_data item 1 has samples of shape \(1, 10, 10\), item 0 has \(1, 12, 12\)"),
    ("list of 2-D tensors", TinyRes(), [torch.zeros(12, 12)] * 32, ValueError,
     r"item 0 has shape \(12, 12\); each item must be a batch \(B, C, H, W\) or one sample \(C, H, W\)"),
    ("a string", TinyRes(), "images.npz", TypeError, r"calib_data must be a float torch.Tensor .*; got str"),
    ("list of strings", TinyRes(), ["a.png", "b.png"], TypeError, r"calib_data item 0 is a str; calib_data must be"),
]


@pytest.mark.parametrize("model, data, exc, pattern", [c[1:] for c in CALIB_ERRORS], ids=[c[0] for c in CALIB_ERRORS])
def test_calibration_input_errors_name_the_cause(model, data, exc, pattern):
    with pytest.raises(exc) as info:
        calibrate(model.eval(), data, "rtn", config=CalibConfig(**SMALL))
    msg = str(info.value)
    assert "\n" not in msg and re.search(pattern, msg), msg


def _loader(x, labels=True, **kw):
    ds = TensorDataset(x, torch.zeros(len(x))) if labels else x
    return DataLoader(ds, batch_size=8, **kw)


def _samples(x):
    return iter(list(x))  # a generator-like iterable of single (C, H, W) samples


CALIB_HANDLED = [  # id, data builder(x) -> calib_data, same result as the tensor?
    ("DataLoader of (x, y) tuples", lambda x: _loader(x), True),
    ("DataLoader of tensors", lambda x: _loader(x, labels=False), True),
    ("shuffled DataLoader: seeded", lambda x: _loader(x, shuffle=True), False),
    ("list of batches", lambda x: list(x.split(8)), True),
    ("tuple of batches", lambda x: tuple(x.split(5)), True),
    ("list of single samples", lambda x: list(x), True),
    ("iterator of samples", _samples, True),
    ("list of numpy batches", lambda x: [b.numpy() for b in x.split(16)], True),
    ("TensorDataset of (x, y) samples", lambda x: TensorDataset(x, torch.zeros(len(x))), True),
    ("DataLoader longer than num_samples", lambda x: _loader(torch.cat([x, -x, 2 * x])), True),
]


def _state(qm) -> dict:
    return {k: v.clone() for k, v in qm.state_dict().items()}


@pytest.fixture(scope="module")
def reference_qmodel():
    torch.manual_seed(0)
    net = TinyRes(c=8).eval()
    return net, _state(calibrate(net, _x(), "qdrop", config=CalibConfig(**SMALL)))


@pytest.mark.parametrize("make, same", [c[1:] for c in CALIB_HANDLED], ids=[c[0] for c in CALIB_HANDLED])
def test_calibration_data_containers_are_handled(reference_qmodel, make, same):
    net, ref = reference_qmodel
    torch.manual_seed(123)  # the global generator must not matter
    a = _state(calibrate(net, make(_x()), "qdrop", config=CalibConfig(**SMALL)))
    torch.manual_seed(456)
    b = _state(calibrate(net, make(_x()), "qdrop", config=CalibConfig(**SMALL)))
    assert a.keys() == b.keys() == ref.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded: reproducible
    assert all(torch.equal(a[k], ref[k]) for k in a) == same


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(1, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU()
        self.drop, self.gap, self.fc = nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.gap(self.drop(self.relu(self.bn(self.conv(x))))), 1))


@pytest.mark.parametrize("make", [lambda: TinyRes(c=8), _BNNet], ids=["TinyRes in train mode", "BN net in train mode"])
def test_train_mode_is_calibrated_in_eval_mode_with_a_warning(make):
    torch.manual_seed(0)
    net = make().train()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.warns(CalibrationWarning, match=r"is in train mode; calibrating it in eval mode .*model\.eval\(\)"):
        a = _state(calibrate(net, _x(), "qdrop", config=CalibConfig(**SMALL)))
    assert net.training and all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # not changed
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        b = _state(calibrate(net.eval(), _x(), "qdrop", config=CalibConfig(**SMALL)))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_parameter_free_module_called_twice_is_handled():
    class Pool2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c0, self.c1, self.pool = nn.Conv2d(1, 4, 3, 1, 1), nn.Conv2d(4, 4, 3, 1, 1), nn.MaxPool2d(2)
            self.relu, self.fc = nn.ReLU(), nn.Linear(4 * 3 * 3, 2)

        def forward(self, x):
            x = self.pool(self.relu(self.c0(x)))
            return self.fc(torch.flatten(self.pool(self.relu(self.c1(x))), 1))

    net = Pool2().eval()
    qm = calibrate(net, _x(), "rtn", config=CalibConfig(**SMALL))
    assert [s.op for s in qm.program] == ["input", "c0", "pool", "c1", "pool_1", "flatten", "fc"]
    assert qm.deploy(_x(4)).shape == (4, 2)


def test_calibrate_cli_refuses_integer_x(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 1, 32, 32), np.uint8))
    rc = calib_cli.main([*CALIB, "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "q.onnx")])
    assert rc == 2 and re.search(r"'x' must hold float model inputs, got dtype uint8",
                                 _one_line(capsys.readouterr().err, "ioso-calibrate"))
    assert not (tmp_path / "q.onnx").exists()
