"""Shared pieces of the command lines (``tvmc``, ``ioso-calibrate``): one-line errors, file checks,
the lazily loaded compile API and the ``main`` wrapper that turns every error into one line."""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import typing
from collections.abc import Callable, Sequence
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
