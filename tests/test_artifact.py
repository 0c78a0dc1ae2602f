"""The compiled-model .tar: round trip, no pickle, safe extraction, version and integrity checks."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hw_model.config import NPUConfig
from target_npu import artifact as art

PROGRAMS = {"npu_fn_0": {"instructions": [{"op": "LOAD", "addr": 0, "size": 256}], "buffers": {"in": [1, 16, 4, 4]}}}
META = {"target": "ioso_npu", "inputs": [{"name": "input", "shape": [1, 1, 32, 32], "dtype": "float32"}]}
REPORT = {"layers": [{"name": "conv0", "cycles": 123, "device": "npu"}], "total_cycles": 123}


def _save(tmp_path: Path, **kw) -> Path:
    args = dict(config=NPUConfig(pe_arrays=2), meta=META, programs=PROGRAMS,
                constants={"w0": np.arange(-8, 8, dtype=np.int8).reshape(4, 4)}, report=REPORT)
    args.update(kw)
    return art.save_artifact(tmp_path / "m.tar", **args)


def _write_tar(path: Path, members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


_dtypes = st.sampled_from([np.int8, np.uint8, np.int32, np.float32, np.int64])


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 5), max_size=4), min_size=0, max_size=4), dtype=_dtypes,
       seed=st.integers(0, 2**31 - 1), arrays=st.integers(1, 8))
def test_round_trip_is_exact(tmp_path_factory, shapes, dtype, seed, arrays):
    rng = np.random.default_rng(seed)
    consts = {f"c{i}": rng.integers(-100, 100, size=tuple(s)).astype(dtype) for i, s in enumerate(shapes)}
    cfg = NPUConfig(pe_arrays=arrays, isg_group_signs=(0, 1))
    path = _save(tmp_path_factory.mktemp("rt"), config=cfg, constants=consts)
    a = art.load_artifact(path)
    assert a.config == cfg
    assert a.meta == META and a.programs == PROGRAMS and a.report == REPORT
    assert sorted(a.constants) == sorted(consts)
    for k, v in consts.items():
        assert a.constants[k].dtype == v.dtype and np.array_equal(a.constants[k], v)
    assert a.host_lib is None
    assert art.read_manifest(path)["format_version"] == art.FORMAT_VERSION


def test_no_pickle_in_members(tmp_path):
    path = _save(tmp_path)
    members = _members(path)
    assert set(members) == set(art.REQUIRED_MEMBERS)
    for name, data in members.items():
        if name.endswith(".json"):
            json.loads(data)  # plain JSON
    with np.load(io.BytesIO(members[art.CONSTANTS]), allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)


def test_object_constants_refused(tmp_path):
    with pytest.raises(TypeError, match="'bad'.*not numeric"):
        _save(tmp_path, constants={"bad": np.array([{"a": 1}], dtype=object)})


def test_unserialisable_program_refused(tmp_path):
    with pytest.raises(TypeError, match="programs"):
        _save(tmp_path, programs={"p": object()})


def test_wrong_suffix_and_config_type(tmp_path):
    with pytest.raises(ValueError, match=r"\.tar"):
        art.save_artifact(tmp_path / "m.zip", config=NPUConfig())
    with pytest.raises(TypeError, match="NPUConfig"):
        art.save_artifact(tmp_path / "m.tar", config={"pe_arrays": 4})


def _pickled_npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, evil=np.array([{"a": 1}], dtype=object))
    return buf.getvalue()


def _rewrite(path: Path, dest: Path, change: dict[str, bytes], fix_hashes: bool = True) -> Path:
    import hashlib

    members = _members(path)
    members.update(change)
    manifest = json.loads(members[art.MANIFEST])
    if fix_hashes:
        manifest["members"] = {n: hashlib.sha256(b).hexdigest() for n, b in members.items() if n != art.MANIFEST}
        manifest["sizes"] = {n: len(b) for n, b in members.items() if n != art.MANIFEST}
    if art.MANIFEST not in change:
        members[art.MANIFEST] = json.dumps(manifest).encode()
    return _write_tar(dest, members)


def test_pickled_constants_refused_on_load(tmp_path):
    bad = _rewrite(_save(tmp_path), tmp_path / "bad.tar", {art.CONSTANTS: _pickled_npz()})
    with pytest.raises(art.ArtifactError, match="constants.npz cannot be read without pickle"):
        art.load_artifact(bad)


@pytest.mark.parametrize("version", [0, 2, 4, "3", None])
def test_other_format_version_refused(tmp_path, version):
    path = _save(tmp_path)
    manifest = json.loads(_members(path)[art.MANIFEST])
    manifest["format_version"] = version
    bad = _rewrite(path, tmp_path / "v.tar", {art.MANIFEST: json.dumps(manifest).encode()}, fix_hashes=False)
    with pytest.raises(art.ArtifactError, match=f"format version {version!r}.*reads version {art.FORMAT_VERSION}"):
        art.load_artifact(bad)
    with pytest.raises(art.ArtifactError, match="format version"):
        art.read_manifest(bad)


def test_corrupt_member_detected(tmp_path):
    path = _save(tmp_path)
    same_size = _members(path)[art.REPORT].replace(b"123", b"124")  # one byte flipped: the hash catches it
    bad = _rewrite(path, tmp_path / "c.tar", {art.REPORT: same_size}, fix_hashes=False)
    with pytest.raises(art.ArtifactError, match="'report.json' is corrupt"):
        art.load_artifact(bad)
    longer = json.dumps({"layers": [], "total_cycles": 1, "pad": "x" * 200}).encode()
    bad = _rewrite(path, tmp_path / "s.tar", {art.REPORT: longer}, fix_hashes=False)
    with pytest.raises(art.ArtifactError, match="'report.json' is .* bytes, the manifest says"):
        art.load_artifact(bad)


def test_member_size_cap_checked_before_reading(tmp_path, monkeypatch):
    path = _save(tmp_path)
    monkeypatch.setitem(art.MAX_MEMBER_BYTES, art.CONSTANTS, 16)
    with pytest.raises(art.ArtifactError, match="'constants.npz' is .* bytes, more than the 16 allowed"):
        art.load_artifact(path)


@pytest.mark.parametrize("name, match", [
    ("/etc/evil.json", "absolute path"),
    ("../evil.json", r"leaves the archive"),
    ("sub/../../x", r"leaves the archive"),
    ("sub/config.json", "unexpected member"),
    ("evil.py", "unexpected member"),
])
def test_unsafe_member_names_refused(tmp_path, name, match):
    members = _members(_save(tmp_path))
    members[name] = b"{}"
    bad = _write_tar(tmp_path / "u.tar", members)
    with pytest.raises(art.ArtifactError, match=match):
        art.load_artifact(bad, extract_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not Path("/etc/evil.json").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE])
def test_links_and_special_members_refused(tmp_path, kind):
    members = _members(_save(tmp_path))
    info = tarfile.TarInfo("host.so")
    info.type = kind
    info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    bad = _write_tar(tmp_path / "l.tar", members, extra=[info])
    with pytest.raises(art.ArtifactError, match="refusing"):
        art.load_artifact(bad, extract_dir=tmp_path / "out")


def test_duplicate_and_missing_members(tmp_path):
    members = _members(_save(tmp_path))
    dup = _write_tar(tmp_path / "d.tar", members, extra=[])
    with tarfile.open(dup, "a") as tar:
        info = tarfile.TarInfo(art.REPORT)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(art.ArtifactError, match="appears twice"):
        art.load_artifact(dup)
    del members[art.PROGRAMS]
    with pytest.raises(art.ArtifactError, match=r"missing member\(s\) \['programs.json'\]"):
        art.load_artifact(_write_tar(tmp_path / "m.tar", members))


def test_not_a_tar_and_missing_file(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(art.ArtifactError, match="junk.tar is not a compiled-model .tar"):
        art.load_artifact(junk)
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        art.load_artifact(tmp_path / "nope.tar")
    foreign = _write_tar(tmp_path / "f.tar", {art.MANIFEST: b'{"format": "something-else"}'})
    with pytest.raises(art.ArtifactError, match="not an ioso_npu artifact"):
        art.load_artifact(foreign)


def test_bad_config_in_artifact(tmp_path):
    cfg = json.dumps({**NPUConfig().to_dict(), "pe_arrays": -1}).encode()
    bad = _rewrite(_save(tmp_path), tmp_path / "cfg.tar", {art.CONFIG: cfg})
    with pytest.raises(art.ArtifactError, match="config.json is not a valid NPUConfig.*pe_arrays"):
        art.load_artifact(bad)


def test_host_library_round_trip(tmp_path):
    """The Relax VM executable survives the tar and computes the same result after loading."""
    tvm = pytest.importorskip("tvm")
    from tvm import relax
    from tvm.script import relax as R

    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((2, 3), "int32"))
    k = np.arange(6, dtype=np.int32).reshape(2, 3)
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.multiply(x, relax.const(k))))
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target="llvm")
    path = _save(tmp_path, executable=ex)
    untrusted = art.load_artifact(path)
    assert untrusted.host_lib is None and untrusted.has_host_lib
    with pytest.raises(art.ArtifactError, match="runs code from the file.*trust=True"):
        untrusted.load_host_module()
    a = art.load_artifact(path, trust=True)
    assert a.host_lib is not None and a.host_lib.name == art.HOST_LIB
    vm = relax.VirtualMachine(a.load_host_module(), tvm.cpu())
    xin = np.random.default_rng(0).integers(-50, 50, (2, 3)).astype(np.int32)
    assert np.array_equal(vm["main"](tvm.runtime.tensor(xin)).numpy(), xin * k)
    with pytest.raises(art.ArtifactError, match="no host part"):
        art.load_artifact(_save(tmp_path / "b"), trust=True).load_host_module()
