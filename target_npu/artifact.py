"""A compiled model as one ``.tar`` file: the only place that writes or reads it.

Members (flat names, regular files only; no pickle anywhere):

``manifest.json``
    ``{"format": "ioso_npu-artifact", "format_version": 1, "producer": "ioso_npu <version>",
    "members": {name: sha256 hex}}``. Read first; another format version is refused.
``config.json``
    ``NPUConfig.to_dict()`` of the configuration the model was compiled for.
``meta.json``
    Interface of the model: ``{"target": str, "inputs": [{"name", "shape", "dtype"}], "layers":
    [layer descriptions], ...}`` (free-form JSON object beyond these keys). The layer descriptions
    (with ``constants.npz``) serve the layers left on the CPU and the report.
``programs.json``
    The NPU programs: ``{"regions": [{"region": <dataflow of the region's layers>, "stream": <the
    region's ONE instruction stream: hw_model Program JSON, ISA version, instructions, DRAM memory
    map with byte addresses, constants in NPU layout (base64)>}]}``. Loading validates each stream
    against ``config.json`` and its memory map and runs it as stored; nothing is rebuilt.
``constants.npz``
    Layer constants (weights, NORM constants, ...) by name, for the CPU layers; numeric dtypes only,
    read with ``allow_pickle=False``.
``report.json``
    The compile report (per-layer table, pass statistics), a JSON object.
``host.so`` (optional)
    The host part: the Relax VM executable written by ``export_library``.

Extraction refuses absolute paths, ``..``, links, directories and any member name not listed
above, and then extracts with ``tarfile``'s ``filter="data"``; every member's sha256 must
match the manifest.
"""
from __future__ import annotations

import hashlib
import io
import json
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
FORMAT_VERSION = 2
"""Version of the member layout above; bump on any incompatible change (chosen: starts at 1; 2: programs.json
holds the linked region streams)."""

MANIFEST, CONFIG, META, PROGRAMS, CONSTANTS, REPORT, HOST_LIB = (
    "manifest.json", "config.json", "meta.json", "programs.json", "constants.npz", "report.json", "host.so")
REQUIRED_MEMBERS = (MANIFEST, CONFIG, META, PROGRAMS, CONSTANTS, REPORT)
KNOWN_MEMBERS = (*REQUIRED_MEMBERS, HOST_LIB)
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
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def load_host_module(self) -> Any:
        """The host part as a ``tvm.runtime.Module`` (for ``relax.VirtualMachine``)."""
        if self.host_lib is None:
            raise ArtifactError("artifact has no host part (host.so); it was saved without a Relax VM executable")
        import tvm  # lazy: reading programs/constants/report needs no TVM

        return tvm.runtime.load_module(str(self.host_lib))


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
                  report: Mapping[str, Any] | None = None, executable: Any = None) -> Path:
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
    if executable is not None:
        if not hasattr(executable, "export_library"):
            raise TypeError(f"save_artifact: executable must have export_library(), got {type(executable).__name__}")
        with tempfile.TemporaryDirectory(prefix="ioso_art_") as tmp:
            lib = Path(tmp) / HOST_LIB
            executable.export_library(str(lib))
            members[HOST_LIB] = lib.read_bytes()
    manifest = {"format": ARTIFACT_FORMAT, "format_version": FORMAT_VERSION, "producer": _producer(),
                "members": {n: hashlib.sha256(b).hexdigest() for n, b in sorted(members.items())}}
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


def load_artifact(path: str | Path, extract_dir: str | Path | None = None) -> Artifact:
    """Read a compiled-model ``.tar`` written by :func:`save_artifact`.

    The members are extracted (safely, see the module docstring) into ``extract_dir`` or a
    temporary directory owned by the returned :class:`Artifact`. Raises FileNotFoundError
    for a missing file and ArtifactError (a ValueError) for anything unsafe, corrupt or
    of another format version, naming the file and the member.
    """
    path = Path(path)
    with _open_tar(path) as tar:
        members = check_members(tar, path)
        names = {m.name for m in members}
        if MANIFEST not in names:
            raise ArtifactError(f"{path}: manifest.json missing; not an ioso_npu artifact")
        manifest = _check_manifest(tar.extractfile(MANIFEST).read(), path)
        missing = [n for n in REQUIRED_MEMBERS if n not in names]
        if missing:
            raise ArtifactError(f"{path}: missing member(s) {missing}")
        tmp = None
        if extract_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="ioso_art_")
            workdir = Path(tmp.name)
        else:
            workdir = Path(extract_dir)
            workdir.mkdir(parents=True, exist_ok=True)
        tar.extractall(workdir, members=members, filter="data")
    data = {n: (workdir / n).read_bytes() for n in names if n != HOST_LIB}
    for name in sorted(names - {MANIFEST}):
        raw = data[name] if name in data else (workdir / name).read_bytes()
        expected = manifest["members"].get(name)
        if expected is None:
            raise ArtifactError(f"{path}: member {name!r} is not listed in the manifest")
        if hashlib.sha256(raw).hexdigest() != expected:
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
    host = workdir / HOST_LIB if HOST_LIB in names else None
    return Artifact(config=config, meta=objs[META], programs=objs[PROGRAMS], constants=constants,
                    report=objs[REPORT], host_lib=host, workdir=workdir, manifest=manifest, _tmp=tmp)
