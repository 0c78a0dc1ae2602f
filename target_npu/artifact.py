"""A compiled model as one ``.tar`` file: the only place that writes or reads it.

Members (flat names, regular files only; no pickle anywhere):

``manifest.json``
    ``{"format": "ioso_npu-artifact", "format_version": 3, "producer": "ioso_npu <version>",
    "members": {name: sha256 hex}}``. Read first; another format version is refused.
``config.json``
    ``NPUConfig.to_dict()`` of the configuration the model was compiled for.
``meta.json``
    Interface of the model: ``{"target": str, "inputs": [{"name", "shape", "dtype"}], "layers":
    [layer descriptions], ...}`` (free-form JSON object beyond these keys). A layer description is
    ``target_npu.layer.layer_record``: kind, name, the type of its ``hw_model`` spec and the spec's
    scalar fields, input / output shapes and dtypes; the spec's array fields are in ``constants.npz``
    as ``<layer index>.<field>``. They serve the layers left on the CPU and the report.
``programs.json``
    The NPU programs: ``{"regions": [{"region": <dataflow of the region's layers>, "stream": <the
    region's ONE instruction stream: hw_model Program JSON, ISA version, instructions, DRAM memory
    map with byte addresses, constants in NPU layout (base64)>}]}``. Loading validates each stream
    against ``config.json`` and its memory map and runs it as stored; nothing is rebuilt.
``constants.npz``
    The layers' spec arrays (weights, NORM constants, ISG groups) as ``<layer index>.<field>``; numeric dtypes only,
    read with ``allow_pickle=False``.
``report.json``
    The compile report (per-layer table, pass statistics), a JSON object.
``host_ir.json`` (optional for :func:`save_artifact`, always written by ``CompiledModel.export``)
    The host part as data: the partitioned Relax module (TVM JSON). ``ioso_tvm.load`` rebuilds the
    VM executable from it after checking it calls only this model's runtime functions
    (``target_npu.host_ir``); nothing from the file is executed.
``host.so`` (optional)
    The host part as a native library (``export_library``). Loading it runs code from the file, so
    it is read only with ``trust=True`` (``tvmc run --trust-artifact``); when the environment holds
    ``IOSO_NPU_ARTIFACT_KEY`` the manifest must then carry a valid HMAC-SHA256 ``signature`` made with
    that key at export.

Reading refuses absolute paths, ``..``, links, directories and any member name not listed above;
every member's size is checked against the manifest's ``sizes`` and the caps in
:data:`MAX_MEMBER_BYTES` before it is read, and its sha256 against the manifest's ``members``.
Members are read into memory; only a trusted ``host.so`` is written to disk (and removed again if
anything fails).
"""
from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from hw_model.config import NPUConfig

ARTIFACT_FORMAT = "ioso_npu-artifact"
FORMAT_VERSION = 3
"""Version of the member layout above; bump on any incompatible change (chosen: starts at 1; 2: programs.json
holds the linked region streams)."""

MANIFEST, CONFIG, META, PROGRAMS, CONSTANTS, REPORT, HOST_IR, HOST_LIB = (
    "manifest.json", "config.json", "meta.json", "programs.json", "constants.npz", "report.json", "host_ir.json",
    "host.so")
REQUIRED_MEMBERS = (MANIFEST, CONFIG, META, PROGRAMS, CONSTANTS, REPORT)
KNOWN_MEMBERS = (*REQUIRED_MEMBERS, HOST_IR, HOST_LIB)
MAX_MEMBER_BYTES = {MANIFEST: 1 << 20, CONSTANTS: 4 << 30, HOST_LIB: 512 << 20}
"""Largest member read (bytes); JSON members not listed: ``MAX_JSON_BYTES``. Chosen: 4 GiB of constants holds
a ResNet-152 at 8 bits many times over; a manifest is a few hundred bytes."""
MAX_JSON_BYTES = 1 << 30
SIGNING_KEY_ENV = "IOSO_NPU_ARTIFACT_KEY"
"""Environment variable holding the HMAC key that signs artifacts at export and is checked for trusted loads."""
_NAME_RE = re.compile(r"^[A-Za-z0-9_.]+$")


class ArtifactError(ValueError):
    """A compiled-model ``.tar`` is missing, unsafe, corrupt or of another format version."""


@dataclass
class Artifact:
    """The content of a compiled-model ``.tar``, as read back by :func:`load_artifact`.

    ``host_lib`` is the extracted ``host.so`` (or None); it lives in ``workdir``, which
    stays on disk as long as this object (or the caller's own ``extract_dir``) lives.
    """

    config: NPUConfig
    meta: dict[str, Any]
    programs: dict[str, Any]
    constants: dict[str, np.ndarray]
    report: dict[str, Any]
    host_lib: Path | None = None
    workdir: Path | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    host_ir: bytes | None = None
    has_host_lib: bool = False
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def load_host_module(self) -> Any:
        """The native host part (``host.so``) as a ``tvm.runtime.Module``: runs code from the file, so only
        for an artifact read with ``trust=True``."""
        if self.host_lib is None:
            if self.has_host_lib:
                raise ArtifactError("the native host library (host.so) runs code from the file: read the artifact "
                                    "with trust=True (tvmc run --trust-artifact) to load it, or rebuild the host "
                                    "part from host_ir.json (the default of ioso_tvm.load)")
            raise ArtifactError("artifact has no host part (host.so); it was saved without a Relax VM executable")
        import tvm  # lazy: reading programs/constants/report needs no TVM

        return tvm.runtime.load_module(str(self.host_lib))

    def build_host_module(self) -> tuple[Any, Any]:
        """(VM executable, IRModule) rebuilt from ``host_ir.json`` (``target_npu.host_ir``); runs no code from
        the file."""
        from target_npu.host_ir import HostIRError, build_host

        if self.host_ir is None:
            raise ArtifactError("artifact has no host_ir.json; re-export it with this ioso_npu, or load it with "
                                "trust=True to use its native host.so")
        try:
            return build_host(self.host_ir, str(self.meta.get("prefix", "")))
        except HostIRError as e:
            raise ArtifactError(str(e)) from None


# ------------------------------------------------------------------------------------ write
def _json_bytes(obj: Any, what: str) -> bytes:
    try:
        return json.dumps(obj, indent=1, sort_keys=True, allow_nan=False, default=_to_jsonable).encode()
    except (TypeError, ValueError) as e:
        raise TypeError(f"artifact {what} is not JSON-serialisable: {e}") from e


def _to_jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON-serialisable")


def _npz_bytes(constants: Mapping[str, Any]) -> bytes:
    arrays = {}
    for name, value in constants.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"artifact constants: names must be non-empty strings, got {name!r}")
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"artifact constant {name!r}: dtype {arr.dtype} is not numeric (no pickled objects)")
        arrays[name] = arr
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _producer() -> str:
    try:
        return f"ioso_npu {metadata.version('ioso_npu')}"
    except metadata.PackageNotFoundError:
        return "ioso_npu (not installed)"


def save_artifact(path: str | Path, *, config: NPUConfig, meta: Mapping[str, Any] | None = None,
                  programs: Mapping[str, Any] | None = None, constants: Mapping[str, Any] | None = None,
                  report: Mapping[str, Any] | None = None, executable: Any = None,
                  host_ir: str | None = None) -> Path:
    """Write a compiled model to ``path`` (a ``.tar``) and return the path.

    ``programs`` values are JSON objects or objects with ``to_dict()``; ``constants`` are
    numeric arrays; ``executable`` is a Relax ``VMExecutable`` (or anything with
    ``export_library(path)``), stored as ``host.so``. Raises TypeError naming the bad part.
    """
    if not isinstance(config, NPUConfig):
        raise TypeError(f"save_artifact: config must be an NPUConfig, got {type(config).__name__}")
    path = Path(path)
    if path.suffix != ".tar":
        raise ValueError(f"save_artifact: output path must end in .tar, got {str(path)!r}")
    members: dict[str, bytes] = {
        CONFIG: _json_bytes(config.to_dict(), "config"),
        META: _json_bytes(dict(meta or {}), "meta"),
        PROGRAMS: _json_bytes(dict(programs or {}), "programs"),
        CONSTANTS: _npz_bytes(constants or {}),
        REPORT: _json_bytes(dict(report or {}), "report"),
    }
    if host_ir is not None:
        members[HOST_IR] = host_ir.encode()
    if executable is not None:
        if not hasattr(executable, "export_library"):
            raise TypeError(f"save_artifact: executable must have export_library(), got {type(executable).__name__}")
        with tempfile.TemporaryDirectory(prefix="ioso_art_") as tmp:
            lib = Path(tmp) / HOST_LIB
            executable.export_library(str(lib))
            members[HOST_LIB] = lib.read_bytes()
    manifest = {"format": ARTIFACT_FORMAT, "format_version": FORMAT_VERSION, "producer": _producer(),
                "members": {n: hashlib.sha256(b).hexdigest() for n, b in sorted(members.items())},
                "sizes": {n: len(b) for n, b in sorted(members.items())}}
    key = os.environ.get(SIGNING_KEY_ENV)
    if key:
        manifest["signature"] = _signature(manifest, key)
    members = {MANIFEST: _json_bytes(manifest, "manifest"), **members}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(path.name + ".partial")
    with tarfile.open(tmp_path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    tmp_path.replace(path)  # atomic: a crash never leaves a half-written artifact under the real name
    return path


# ------------------------------------------------------------------------------------- read
def check_members(tar: tarfile.TarFile, source: str | Path) -> list[tarfile.TarInfo]:
    """The members of ``tar`` if every one is a safe, known, regular file; else ArtifactError.

    Refused: absolute paths, ``..`` or any directory part, links, devices, directories,
    duplicates and names not in :data:`KNOWN_MEMBERS`.
    """
    members = tar.getmembers()
    seen: set[str] = set()
    for m in members:
        name = m.name
        if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
            raise ArtifactError(f"{source}: refusing member with an absolute path: {name!r}")
        if ".." in Path(name).parts:
            raise ArtifactError(f"{source}: refusing member whose path leaves the archive ('..'): {name!r}")
        if m.issym() or m.islnk():
            raise ArtifactError(f"{source}: refusing link member {name!r} -> {m.linkname!r}")
        if not m.isfile():
            raise ArtifactError(f"{source}: refusing member {name!r}: not a regular file")
        if "/" in name or not _NAME_RE.match(name) or name not in KNOWN_MEMBERS:
            raise ArtifactError(f"{source}: unexpected member {name!r}; an artifact holds only {list(KNOWN_MEMBERS)}")
        if name in seen:
            raise ArtifactError(f"{source}: member {name!r} appears twice")
        seen.add(name)
    return members


def _open_tar(path: Path) -> tarfile.TarFile:
    if not path.exists():
        raise FileNotFoundError(f"artifact {str(path)!r} does not exist")
    if not path.is_file():
        raise ArtifactError(f"artifact {str(path)!r} is not a file")
    try:
        return tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as e:
        raise ArtifactError(f"{path} is not a compiled-model .tar ({e})") from e


def _check_manifest(raw: bytes, source: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{source}: manifest.json is not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{source} is not an ioso_npu artifact (manifest format is not {ARTIFACT_FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{source} has artifact format version {version!r} (written by {manifest.get('producer', '?')}); "
            f"this ioso_npu reads version {FORMAT_VERSION}: recompile the model with `tvmc compile`")
    if not isinstance(manifest.get("members"), dict):
        raise ArtifactError(f"{source}: manifest.json has no 'members' table")
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The checked manifest of an artifact, without extracting anything else."""
    path = Path(path)
    with _open_tar(path) as tar:
        check_members(tar, path)
        try:
            f = tar.extractfile(MANIFEST)
        except KeyError:
            raise ArtifactError(f"{path}: manifest.json missing; not an ioso_npu artifact") from None
        return _check_manifest(f.read(), path)


def read_member_json(path: str | Path, name: str) -> dict[str, Any]:
    """One JSON member (e.g. ``meta.json``) of a checked artifact, without extracting the rest."""
    path = Path(path)
    if name not in (CONFIG, META, PROGRAMS, REPORT):
        raise ValueError(f"read_member_json: {name!r} is not a JSON member of an artifact")
    with _open_tar(path) as tar:
        names = {m.name for m in check_members(tar, path)}
        if MANIFEST not in names:
            raise ArtifactError(f"{path}: manifest.json missing; not an ioso_npu artifact")
        manifest = _check_manifest(tar.extractfile(MANIFEST).read(), path)
        if name not in names:
            raise ArtifactError(f"{path}: missing member(s) {[name]}")
        _check_sizes([tar.getmember(name)], manifest, path)
        raw = tar.extractfile(name).read()
    if hashlib.sha256(raw).hexdigest() != manifest["members"].get(name):
        raise ArtifactError(f"{path}: member {name!r} is corrupt (sha256 does not match the manifest)")
    obj = _load_json(raw, name, path)
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path}: {name} must hold a JSON object, got {type(obj).__name__}")
    return obj


def _load_json(data: bytes, name: str, source: Path) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{source}: {name} is not valid JSON ({e})") from e


def _signature(manifest: Mapping[str, Any], key: str) -> str:
    """HMAC-SHA256 (hex) of the manifest's member hashes and sizes under ``key``."""
    body = json.dumps({"members": manifest.get("members"), "sizes": manifest.get("sizes")}, sort_keys=True)
    return hmac.new(key.encode(), body.encode(), hashlib.sha256).hexdigest()


def _check_sizes(members: list[tarfile.TarInfo], manifest: dict[str, Any], source: Path) -> None:
    """Every member's size equals the manifest's and is under its cap, before anything is read."""
    sizes = manifest.get("sizes")
    if not isinstance(sizes, dict):
        raise ArtifactError(f"{source}: manifest.json has no 'sizes' table")
    for m in members:
        cap = MAX_MEMBER_BYTES.get(m.name, MAX_JSON_BYTES)
        if m.size > cap:
            raise ArtifactError(f"{source}: member {m.name!r} is {m.size} bytes, more than the {cap} allowed")
        if m.name != MANIFEST and sizes.get(m.name) != m.size:
            raise ArtifactError(f"{source}: member {m.name!r} is {m.size} bytes, the manifest says "
                                f"{sizes.get(m.name)!r}")


def load_artifact(path: str | Path, extract_dir: str | Path | None = None, trust: bool = False) -> Artifact:
    """Read a compiled-model ``.tar`` written by :func:`save_artifact`.

    Members are read into memory after the checks of the module docstring. ``trust=True`` also
    writes ``host.so`` into ``extract_dir`` (or a temporary directory owned by the returned
    :class:`Artifact`) so that :meth:`Artifact.load_host_module` can load it; without it nothing is
    written to disk. Raises FileNotFoundError for a missing file and ArtifactError (a ValueError)
    for anything unsafe, corrupt, unsigned-but-required or of another format version, naming the
    file and the member.
    """
    path = Path(path)
    with _open_tar(path) as tar:
        members = check_members(tar, path)
        names = {m.name for m in members}
        if MANIFEST not in names:
            raise ArtifactError(f"{path}: manifest.json missing; not an ioso_npu artifact")
        man_info = next(m for m in members if m.name == MANIFEST)
        if man_info.size > MAX_MEMBER_BYTES[MANIFEST]:
            raise ArtifactError(f"{path}: manifest.json is {man_info.size} bytes, more than the "
                                f"{MAX_MEMBER_BYTES[MANIFEST]} allowed")
        manifest = _check_manifest(tar.extractfile(MANIFEST).read(), path)
        missing = [n for n in REQUIRED_MEMBERS if n not in names]
        if missing:
            raise ArtifactError(f"{path}: missing member(s) {missing}")
        _check_sizes(members, manifest, path)
        data = {n: tar.extractfile(n).read() for n in sorted(names - {MANIFEST}) if n != HOST_LIB or trust}
    for name in sorted(names - {MANIFEST}):
        expected = manifest["members"].get(name)
        if expected is None:
            raise ArtifactError(f"{path}: member {name!r} is not listed in the manifest")
        if name in data and hashlib.sha256(data[name]).hexdigest() != expected:
            raise ArtifactError(f"{path}: member {name!r} is corrupt (sha256 does not match the manifest)")
    for name in manifest["members"]:
        if name not in names:
            raise ArtifactError(f"{path}: member {name!r} listed in the manifest is missing")
    try:
        config = NPUConfig.from_dict(_load_json(data[CONFIG], CONFIG, path))
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: config.json is not a valid NPUConfig ({e})") from e
    objs = {n: _load_json(data[n], n, path) for n in (META, PROGRAMS, REPORT)}
    for n, obj in objs.items():
        if not isinstance(obj, dict):
            raise ArtifactError(f"{path}: {n} must hold a JSON object, got {type(obj).__name__}")
    try:
        with np.load(io.BytesIO(data[CONSTANTS]), allow_pickle=False) as z:
            constants = {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise ArtifactError(f"{path}: constants.npz cannot be read without pickle ({e})") from e
    tmp, workdir, host = None, None, None
    if trust and HOST_LIB in data:
        key = os.environ.get(SIGNING_KEY_ENV)
        if key and not hmac.compare_digest(str(manifest.get("signature", "")), _signature(manifest, key)):
            raise ArtifactError(f"{path}: the manifest is not signed with the key in {SIGNING_KEY_ENV}; refusing to "
                                f"load its native host library")
        if extract_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="ioso_art_")
            workdir = Path(tmp.name)
        else:
            workdir = Path(extract_dir)
            workdir.mkdir(parents=True, exist_ok=True)
        host = workdir / HOST_LIB
        try:
            host.write_bytes(data[HOST_LIB])
        except OSError as e:
            host.unlink(missing_ok=True)
            raise ArtifactError(f"{path}: cannot write host.so into {workdir} ({e})") from e
    return Artifact(config=config, meta=objs[META], programs=objs[PROGRAMS], constants=constants,
                    report=objs[REPORT], host_lib=host, workdir=workdir, manifest=manifest,
                    host_ir=data.get(HOST_IR), has_host_lib=HOST_LIB in names, _tmp=tmp)
