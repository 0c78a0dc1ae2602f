"""Shared pieces of the command lines (``tvmc``, ``ioso-calibrate``): one-line errors, file checks,
the lazily loaded compile API and the ``main`` wrapper that turns every error into one line."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import sys
import tempfile
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


class CLIError(Exception):
    """A bad command line or input file: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise CLIError (one line, no usage dump) instead of exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise CLIError(f"{message} (see '{self.prog} --help')")


def existing_file(path: str, what: str, suffixes: Sequence[str] = ()) -> Path:
    """``path`` as a Path if it is an existing file with one of ``suffixes``; else CLIError."""
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what} {path!r} does not exist")
    if not p.is_file():
        raise CLIError(f"{what} {path!r} is not a file")
    if suffixes and p.suffix.lower() not in suffixes:
        raise CLIError(f"{what} {path!r} must be a {' or '.join(suffixes)} file")
    return p


def same_file(a: str | Path, b: str | Path) -> bool:
    """True if ``a`` and ``b`` name one file (through symlinks, hard links and relative paths)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare the resolved paths
        return Path(a).resolve() == Path(b).resolve()


def check_output(path: str | Path, flag: str, inputs: Mapping[str, str | Path | None] | None = None,
                 suffixes: Sequence[str] = ()) -> Path:
    """``path`` as a Path if it can be written without destroying anything; else CLIError.

    Checked before any work starts: not one of ``inputs`` (what -> path; None entries are skipped),
    not a directory, its folder exists and is writable, an existing file is writable, the suffix is
    one of ``suffixes`` (when given).
    """
    p = Path(path)
    for what, other in (inputs or {}).items():
        if other is not None and same_file(p, other):
            raise CLIError(f"{flag} {str(path)!r} is the same file as the {what} {str(other)!r}; "
                           f"write the output to another file")
    if suffixes and p.suffix.lower() not in suffixes:
        article = "an" if suffixes[0].lstrip(".")[:1] in "aeio" else "a"
        raise CLIError(f"{flag} must name {article} {' or '.join(suffixes)} file, got {str(path)!r}")
    if p.is_dir():
        raise CLIError(f"{flag} {str(path)!r} is a directory; name a file")
    parent = p.parent
    if not parent.is_dir():
        raise CLIError(f"{flag} {str(path)!r}: the folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {str(path)!r}: the folder {str(parent)!r} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise CLIError(f"{flag} {str(path)!r} exists and is read-only")
    return p


def check_outputs(outputs: Mapping[str, str | Path | None], inputs: Mapping[str, str | Path | None],
                  suffixes: Mapping[str, Sequence[str]] | None = None) -> dict[str, Path]:
    """:func:`check_output` for each given output (flag -> path), and no two outputs the same file."""
    done: dict[str, Path] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        done[flag] = check_output(path, flag, {**inputs, **{f"{f} output": q for f, q in done.items()}},
                                  (suffixes or {}).get(flag, ()))
    return done


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in the folder of ``path`` (same suffix); renamed onto ``path`` when the block
    succeeds, removed when it fails, so ``path`` is either the old file or the complete new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_umask())
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def compile_api() -> Any:
    try:
        return importlib.import_module("ioso_tvm.compiler")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("ioso_tvm"):
            raise CLIError("the compile API (ioso_tvm.compiler) is not available in this installation") from None
        raise


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (the last line of a multi-line TVM error)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].startswith("Traceback") or len(lines) > 3:
        return lines[-1]
    return " ".join(lines)


def run_main(prog: str, parse: Callable[[Sequence[str]], argparse.Namespace], argv: Sequence[str] | None) -> int:
    """Parse and dispatch ``ns.func(ns)``; every error becomes ``<prog>: error: ...`` on one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = sum(a.count("v") for a in argv if re.fullmatch(r"-v+", a)) + argv.count("--verbose")
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2), format=f"{prog}: %(levelname)s: %(message)s")
    try:
        ns = parse(argv)
        return int(ns.func(ns) or 0)
    except SystemExit as e:  # --help / --version
        return int(e.code or 0) if isinstance(e.code, int) or e.code is None else 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except CLIError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the top of the program: one line, no traceback
        if verbose >= 2:
            raise
        known = (ValueError, TypeError, OSError, KeyError, NotImplementedError, OverflowError)
        kind = "" if isinstance(e, known) else f"{type(e).__name__}: "
        print(f"{prog}: error: {kind}{one_line(e)}", file=sys.stderr)
        return 1


def read_npz(path: str, flag: str) -> dict:
    """Arrays of the ``.npz`` file named by command-line option ``flag`` (no pickle); else CLIError."""
    import zipfile

    import numpy as np

    p = existing_file(path, f"{flag} file", (".npz",))
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise CLIError(f"{flag} {path!r} is not a readable npz without pickle ({one_line(e)})") from None


def set_thread_count(n: int | None) -> int:
    """``target_npu.threads.set_threads(n)`` (None: its measured default); a bad count is a CLIError."""
    from target_npu.threads import set_threads

    try:
        return set_threads(n)
    except ValueError as e:
        raise CLIError(f"--threads: {e}") from None
