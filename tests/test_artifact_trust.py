"""An artifact is data: loading runs no code from the file unless the caller opts in (trust=True)."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile

import numpy as np
import pytest

import ioso_tvm
from ioso_tvm.testing import QDQBuilder
from target_npu import artifact as art


def _model(tmp_path):
    rng = np.random.default_rng(4)
    b = QDQBuilder((1, 16, 6, 6), rng)
    y = b.conv(b.input, 16)
    out = b.add(y, b.conv(y, 16, act=None, signed_out=True))
    cm = ioso_tvm.compile(b.model([out]))
    x = rng.standard_normal(b.shape).astype(np.float32)
    return cm, cm.export(tmp_path / "m.tar"), x, b.run_reference(x, [out])[0]


def _replace(src, dst, changes: dict[str, bytes]):
    with tarfile.open(src) as t:
        members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
    members.update(changes)
    man = json.loads(members[art.MANIFEST])
    man["members"] = {n: hashlib.sha256(b).hexdigest() for n, b in members.items() if n != art.MANIFEST}
    man["sizes"] = {n: len(b) for n, b in members.items() if n != art.MANIFEST}
    members[art.MANIFEST] = json.dumps(man).encode()
    with tarfile.open(dst, "w") as t:
        for n, data in members.items():
            info = tarfile.TarInfo(n)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return dst


def _evil_library(tmp_path):
    """A shared library whose constructor writes a marker file when it is loaded."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the foreign library")
    marker = tmp_path / "constructor_ran"
    src = tmp_path / "evil.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void) '
                   f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    lib = tmp_path / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    return lib.read_bytes(), marker


def test_default_load_rebuilds_the_host_and_never_writes_native_code(tmp_path):
    cm, path, x, want = _model(tmp_path)
    out = tmp_path / "extract"
    a = art.load_artifact(path, extract_dir=out)
    assert a.host_lib is None and a.has_host_lib and a.host_ir is not None
    assert not out.exists() or not any(out.iterdir())  # nothing from the file reached the disk
    loaded = ioso_tvm.load(path)
    assert np.array_equal(loaded.run(x), want)
    assert loaded.ir_module is not None and "R.permute_dims" in loaded.ir_module["main"].script()


def test_a_swapped_host_library_is_not_executed(tmp_path):
    _, path, x, want = _model(tmp_path)
    evil, marker = _evil_library(tmp_path)
    swapped = _replace(path, tmp_path / "swapped.tar", {art.HOST_LIB: evil})
    loaded = ioso_tvm.load(swapped)  # manifest re-hashed: integrity alone cannot tell
    assert not marker.exists()
    assert np.array_equal(loaded.run(x), want)
    with pytest.raises(Exception):  # noqa: B017  (the opt-in really loads the file: its constructor runs)
        ioso_tvm.load(swapped, trust=True)
    assert marker.exists()


@pytest.mark.parametrize("symbol, match", [
    ("runtime.GetDeviceAttr", "not a runtime function of this model"),
    ("ioso_npu.m0000000000000000.npu.r0", "not a runtime function of this model"),
])
def test_host_ir_calling_foreign_functions_is_refused(tmp_path, symbol, match):
    cm, path, _, _ = _model(tmp_path)
    with tarfile.open(path) as t:
        raw = t.extractfile(art.HOST_IR).read().replace(cm.streams[0].meta["symbol"].encode(), symbol.encode())
    bad = _replace(path, tmp_path / "bad.tar", {art.HOST_IR: raw})
    with pytest.raises(art.ArtifactError, match=match):
        ioso_tvm.load(bad)


def test_host_ir_that_is_not_an_irmodule_is_refused(tmp_path):
    _, path, _, _ = _model(tmp_path)
    bad = _replace(path, tmp_path / "bad.tar", {art.HOST_IR: b'{"root": 1, "nodes": [{"type_key": ""}]}'})
    with pytest.raises(art.ArtifactError, match="host_ir.json"):
        ioso_tvm.load(bad)


def test_trusted_load_checks_the_signature_when_a_key_is_set(tmp_path, monkeypatch):
    monkeypatch.setenv(art.SIGNING_KEY_ENV, "k1")
    _, path, x, want = _model(tmp_path)
    assert "signature" in art.read_manifest(path)
    assert np.array_equal(ioso_tvm.load(path, trust=True).run(x), want)
    monkeypatch.setenv(art.SIGNING_KEY_ENV, "another key")
    with pytest.raises(art.ArtifactError, match="not signed with the key"):
        ioso_tvm.load(path, trust=True)
    assert np.array_equal(ioso_tvm.load(path).run(x), want)  # the default path needs no signature
