"""benchmarks/accuracy.py machinery on a tiny run: row schema, simulator == deploy, resume, report."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"


@pytest.fixture(scope="module")
def accuracy():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # Ray pickles its functions by value from here
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_quick_run_rows_resume_and_report(accuracy, tmp_path, capsys):
    out = tmp_path / "acc.json"
    first = accuracy.main(["--quick", "--serial", "--out", str(out)])
    rows = json.loads(out.read_text())
    run = [r for r in rows if "method" in r]
    assert first["rows_written"] == len(run) == 1 and first["simulator_vs_deploy_mismatching_rows"] == 0
    r = run[0]
    assert {"model", "wbits", "abits", "method", "seed", "top1", "top1_deploy", "calib_images", "iters",
            "calib_seconds"} <= set(r)
    assert r["top1"] == r["top1_deploy"] and r["logit_mismatches"] == 0 and 0 <= r["top1"] <= 1
    assert any("fp_top1" in x for x in rows)
    again = accuracy.main(["--quick", "--out", str(out)])  # nothing to run: no Ray started
    assert again["rows_written"] == 0 and len(json.loads(out.read_text())) == len(rows)  # resumed: nothing re-run
    capsys.readouterr()
    accuracy.main(["--out", str(out), "--report", str(tmp_path / "acc.png")])
    table = capsys.readouterr().out
    assert "| resnet20 | W4A4 | rtn |" in table
    assert "| model | bits | float | rtn |" in table  # the pivot: one column per method
    assert (tmp_path / "acc.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_arguments(accuracy):
    with pytest.raises(ValueError, match="W4A4"):
        accuracy.parse_bits("4x4")
    with pytest.raises(SystemExit):
        accuracy.main(["--methods", "gptq", "--out", "/nonexistent/x.json"])


def test_merge_adds_missing_rows_only(accuracy, tmp_path):
    base = {"model": "m", "wbits": 2, "abits": 4, "seed": 0, "top1": 0.5, "top1_deploy": 0.5}
    out, other = tmp_path / "out.json", tmp_path / "other.json"
    accuracy.save_rows(out, [{**base, "method": "brecq"}])
    accuracy.save_rows(other, [{**base, "method": "brecq", "top1": 0.9}, {**base, "method": "qdrop"},
                               {"model": "m", "fp_top1": 0.95}])
    assert accuracy.merge_rows(out, [other]) == 2
    rows = {accuracy.row_key(r): r for r in json.loads(out.read_text())}
    assert len(rows) == 3 and rows[("m", 2, 4, "brecq", 0)]["top1"] == 0.5  # --out wins
    assert accuracy.merge_rows(out, [other]) == 0
    with pytest.raises(ValueError, match="missing.json"):
        accuracy.merge_rows(out, [tmp_path / "missing.json"])


def test_not_deployable_ablation_is_marked_fake_quant(accuracy, tmp_path, capsys):
    out = tmp_path / "acc.json"
    res = accuracy.main(["--models", "resnet20", "--bits", "W4A4", "--methods", "ioso_oso_after_act", "--seeds", "0",
                         "--iters", "2", "--act-iters", "2", "--calib-images", "32", "--test-images", "50",
                         "--shipped-data", "--serial", "--out", str(out)])
    row = next(r for r in json.loads(out.read_text()) if "method" in r)
    assert res["rows_written"] == 1 and res["simulator_vs_deploy_mismatching_rows"] == 0
    assert row["eval"] == "fake_quant" and row["top1_deploy"] is None and row["top1"] == row["top1_fakequant"]
    assert "per-channel clamp" in row["not_deployable"]
    capsys.readouterr()
    accuracy.main(["--out", str(out), "--report", str(tmp_path / "acc.png")])
    assert "n/a (fake-quant only)" in capsys.readouterr().out


def test_target_table_compares_gain_with_spread_and_gap_with_float(accuracy):
    def rows(method, bits, tops):
        w, a = accuracy.parse_bits(bits)
        return [{"model": "m", "wbits": w, "abits": a, "method": method, "seed": s, "top1": t, "top1_deploy": t,
                 "calib_seconds": 1.0} for s, t in enumerate(tops)]

    data = [{"model": "m", "fp_top1": 0.95}, *rows("brecq", "W2A4", [0.70, 0.71, 0.72]),
            *rows("ioso_brecq", "W2A4", [0.80, 0.81, 0.80]), *rows("qdrop", "W2A4", [0.70, 0.75, 0.72]),
            *rows("ioso_qdrop", "W2A4", [0.73, 0.74, 0.75]), *rows("ioso_brecq", "W4A4", [0.94, 0.94, 0.94]),
            *rows("ioso_qdrop", "W4A4", [0.92, 0.93])]
    lines = {ln.split("|")[3].strip(): ln for ln in accuracy.target_table(data).splitlines()[2:]}
    assert lines["ioso_brecq - brecq"].endswith("| yes |")  # +9.3 pp > 2 pp spread
    assert lines["ioso_qdrop - qdrop"].endswith("| no |")  # +1.7 pp < 5 pp spread
    assert lines["float - ioso_brecq"].endswith("| yes |")  # 1.0 pp gap, 3 seeds
    assert lines["float - ioso_qdrop"].endswith("| no |")  # 2.5 pp gap, 2 seeds


def test_plan_skips_finished_rows_and_dispatch_reports_every_job(accuracy):
    done = {("m", 4, 4, "rtn", 1)}
    jobs = accuracy.plan_jobs(["m"], ["W4A4", "W2A4"], ["rtn", "brecq"], [0, 1], done)
    assert len(jobs) == 7 and ("m", 4, 4, "rtn", 1) not in jobs and jobs[0] == ("m", 4, 4, "rtn", 0)
    seen = {}
    accuracy.dispatch(lambda job, k: {"job": job, "k": k}, jobs, seen.__setitem__, shared=(3,), serial=True)
    assert seen == {j: {"job": j, "k": 3} for j in jobs}


RAY_GRID = ["--models", "resnet20", "--bits", "W4A4", "--methods", "brecq", "--seeds", "0", "1", "--iters", "2",
            "--act-iters", "2", "--calib-images", "32", "--test-images", "50", "--shipped-data"]
TIMING = {"calib_seconds"}


@pytest.mark.slow
def test_ray_sweep_equals_the_serial_one(accuracy, tmp_path):
    """Two jobs as Ray tasks on a local Ray (2 CPUs) give the rows of the serial path (timings aside)."""
    pytest.importorskip("ray")
    serial, remote = tmp_path / "serial.json", tmp_path / "ray.json"
    assert accuracy.main([*RAY_GRID, "--serial", "--out", str(serial)])["rows_written"] == 2
    assert accuracy.main([*RAY_GRID, "--workers", "2", "--out", str(remote)])["rows_written"] == 2

    def rows(path):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in json.loads(path.read_text())]

    a, b = rows(serial), rows(remote)
    assert len(a) == 3 and a == b  # the float row and both seeds, in one file
