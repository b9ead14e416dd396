"""Writing exports without ever losing a user's file.

The rules (docs/cli.md, "Files scan-export writes"):
- a directory that does not exist is created; an empty one is filled;
- a directory holding a previous export (our scan_export.json) is replaced; only the files that
  export wrote (its `files` list) are removed, anything else in it stays untouched;
- any other non-empty directory, the checkpoint directory itself, or a regular file is refused
  before any work starts; `force` allows a non-empty directory, and even then only our own file
  names are replaced;
- all writing happens in a hidden staging directory that is removed on any failure, Ctrl-C,
  SIGTERM or SIGHUP; the final moves run with those signals held back, so they cannot be cut
  half-way by anything short of SIGKILL;
- what we write is readable by other users: 0644 files and 0755 folders under the usual umask
  (mkdtemp/mkstemp would give 0700/0600, which a web server running as another user can't read).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ScanExportError
from ..runtime.contract import DESCRIPTION_FILE, FORMAT, LEGACY_FILES

STAGING_PREFIX = ".scan-export-staging-"
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(root: Path) -> None:
    """Files 0666 & ~umask, folders 0777 & ~umask: what `touch` and `mkdir` would have made."""
    mask = _umask()
    if root.is_file():
        os.chmod(root, 0o666 & ~mask)
        return
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def previous_export_files(directory: Path) -> set[str] | None:
    """The file names a previous export in `directory` wrote, or None when it holds no export of ours."""
    desc = directory / DESCRIPTION_FILE
    if not desc.is_file():
        return None
    try:
        d = json.loads(desc.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        return None
    files = d.get("files", LEGACY_FILES)  # exports before the manifest wrote only these names
    if not isinstance(files, list):
        return None
    return {f for f in files if isinstance(f, str) and f and "/" not in f and f not in (".", "..")} | {DESCRIPTION_FILE}


def _listing(names, limit: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class OutputPlan:
    """How an export reaches `dest`: 'create' (dest is new), 'swap' (dest is a previous export and
    holds nothing else: the whole directory is exchanged), or 'merge' (dest is empty, or holds files
    of the user's: ours are moved in one by one, scan_export.json last)."""

    dest: Path
    mode: str
    previous: set[str] = field(default_factory=set)


def plan_output_dir(dest, *, force: bool = False, protected: dict | None = None, what: str = "output directory") -> OutputPlan:
    """Check `dest` before any work starts. protected: {path: reason} of directories never written
    into (the checkpoint being exported). Raises ScanExportError naming the path and the way out."""
    raw = str(dest)
    if not raw.strip():
        raise ScanExportError(f"{what}: expected a directory path, got an empty string")
    dest = Path(dest).expanduser().resolve()
    for path, reason in (protected or {}).items():
        if Path(path).expanduser().resolve() == dest:
            raise ScanExportError(f"{what} {raw!r} is {reason}; exporting into it could overwrite its files, "
                                  f"choose another directory")
    if dest.exists() and not dest.is_dir():
        raise ScanExportError(f"{what} {raw!r} is an existing file, expected a directory "
                              f"(new, empty, or a previous export); choose another path")
    if not dest.exists():
        if dest.parent.exists() and not dest.parent.is_dir():
            raise ScanExportError(f"{what} {raw!r}: its parent {str(dest.parent)!r} is a file, expected a directory")
        return OutputPlan(dest, "create")
    entries = {p.name for p in dest.iterdir() if not p.name.startswith(STAGING_PREFIX)}
    previous = previous_export_files(dest)
    if previous is not None:
        foreign = entries - previous
        return OutputPlan(dest, "merge" if foreign or dest == Path.cwd() else "swap", previous & entries)
    if entries and not force:
        raise ScanExportError(f"{what} {raw!r} is not empty and holds no previous export ({_listing(entries)}); "
                              f"choose a new or empty directory, or pass --force to add scan-export's files "
                              f"to it (nothing else in it is touched)")
    return OutputPlan(dest, "merge")


class _Terminated(SystemExit):
    """SIGTERM / SIGHUP turned into an exception, so that cleanup code runs; exit code 128 + signal."""


@contextlib.contextmanager
def signals_raise():
    """Within this block SIGTERM and SIGHUP raise (like SIGINT raises KeyboardInterrupt), so every
    `except BaseException` / `finally` cleanup runs. Only handlers still at their default are replaced,
    and only in the main thread (Python delivers signals there alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {}

    def raise_exit(signum, _frame):
        raise _Terminated(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            saved[sig] = signal.signal(sig, raise_exit)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT/SIGTERM/SIGHUP back while the final renames run; they arrive right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def _remove_ours(directory: Path, names) -> None:
    for name in names:
        p = directory / name
        if p.is_file() or p.is_symlink():
            p.unlink()


@contextlib.contextmanager
def staged_output(plan: OutputPlan):
    """Yield an empty staging directory; on a clean exit its files become plan.dest by plan.mode.
    On any exception or signal the staging directory (and any parent created for it) is removed."""
    dest = plan.dest
    created = []  # parents made for a new dest, removed again on failure while still empty
    if plan.mode == "merge":
        stage_parent = dest
    else:
        stage_parent = dest.parent
        for p in reversed([dest.parent, *dest.parent.parents]):
            if not p.exists():
                p.mkdir()
                created.append(p)
    with signals_raise():
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=stage_parent))
        try:
            yield staging
            make_readable(staging)
            with _signals_held():
                _commit(plan, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            for p in reversed(created):
                with contextlib.suppress(OSError):
                    p.rmdir()
            raise


def _commit(plan: OutputPlan, staging: Path) -> None:
    dest = plan.dest
    if plan.mode == "create":
        if dest.exists():
            raise ScanExportError(f"output directory {str(dest)!r} appeared while exporting; nothing was written to it")
        os.rename(staging, dest)
        return
    if plan.mode == "swap" and _exchange(staging, dest):
        # staging now holds the previous export, and only our files (checked in plan_output_dir).
        _remove_ours(staging, plan.previous)
        with contextlib.suppress(OSError):
            staging.rmdir()
        if staging.exists():  # someone added a file meanwhile: keep it where it is now, and say where
            print(f"scan-export: note: the previous export's folder kept files it did not write; they are in {staging}")
        return
    names = sorted(p.name for p in staging.iterdir())
    clash = [n for n in names if (dest / n).is_dir() and not (dest / n).is_symlink()]
    if clash:
        raise ScanExportError(f"output directory {str(dest)!r} has a folder named {clash[0]!r}, "
                              f"where the export writes a file; move it away")
    for name in names:  # the description last: until it lands, readers see the old export whole
        if name != DESCRIPTION_FILE:
            os.replace(staging / name, dest / name)
    if DESCRIPTION_FILE in names:
        os.replace(staging / DESCRIPTION_FILE, dest / DESCRIPTION_FILE)
    _remove_ours(dest, plan.previous - set(names))  # e.g. model.onnx.data of a larger previous export
    staging.rmdir()


def check_output_file(path, *, force: bool = False, ours=None, what: str = "--out") -> Path:
    """A single output file: refuse a directory, and an existing file unless ours(path) says we wrote
    it or force is set."""
    raw = str(path)
    if not raw.strip():
        raise ScanExportError(f"{what}: expected a file path, got an empty string")
    path = Path(path).expanduser()
    if path.is_dir():
        raise ScanExportError(f"{what} {raw!r} is a directory, expected a file path such as {raw.rstrip('/')}/scan.onnx")
    if path.exists() and not force and not (ours and ours(path)):
        raise ScanExportError(f"{what} {raw!r} exists and was not written by scan-export; "
                              f"choose another path, or pass --force to overwrite it")
    if path.parent.exists() and not path.parent.is_dir():
        raise ScanExportError(f"{what} {raw!r}: its parent {str(path.parent)!r} is a file, expected a directory")
    return path


def write_file_atomically(path: Path, write) -> Path:
    """write(tmp_path) fills a hidden temporary next to path, which then replaces path in one step;
    on any failure or signal the temporary is gone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with signals_raise():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            make_readable(Path(tmp))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path
