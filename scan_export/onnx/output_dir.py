"""Writing exports without ever losing a user's file.

The rules (docs/cli.md, "Files scan-export writes"):
- a directory that does not exist is created; an empty one is filled;
- a directory holding a previous export (our scan_export.json) is replaced; a file in it is removed
  or replaced only when it is provably ours: its content matches the sha256 that export recorded
  (scan_export.json's `sha256`), checked again right before removal. scan_export.json is a claim,
  not a proof: a listed file without a matching hash (a forged or copied-in manifest, an export
  from before the hashes, a file the user changed since) is the user's, and is replaced only
  where the new export's file is byte-identical to it. Manifest names never leave the directory
  (no "/", "..", NUL; a symlink is never ours);
- any other non-empty directory, the checkpoint directory itself, or a regular file is refused
  before any work starts; `force` allows a non-empty directory, and even then a file of the
  user's that carries one of our names is refused (named), never replaced;
- all writing happens in a hidden staging directory that is removed on any failure, Ctrl-C,
  SIGTERM or SIGHUP; the final moves run with those signals held back, so they cannot be cut
  half-way by anything short of SIGKILL;
- what we write is readable by other users: 0644 files and 0755 folders under the usual umask
  (mkdtemp/mkstemp would give 0700/0600, which a web server running as another user can't read);
- a staging directory holds an owner marker (pid and process start time) until its files move:
  one left by a SIGKILLed export is recognised by that marker, and removed by the next export
  next to it once its owner is dead. A staging-named folder without our marker is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import stat
import sys
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ScanExportError, read_json_object
from ..resources import free_disk, human_bytes
from ..contract import DESCRIPTION_FILE, FORMAT, LEGACY_FILES, plain_name

STAGING_PREFIX = ".scan-export-staging-"
# In every staging directory until its files move into place: who is writing it (stale_staging).
OWNER_FILE = ".scan-export-owner.json"
# scan_export.json's {file name: sha256 hex} of every file the export wrote but itself.
HASHES = "sha256"
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


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def is_ours(path: Path, digest) -> bool:
    """path is a regular file (not a symlink) whose content has the sha256 `digest` we recorded."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        return isinstance(digest, str) and file_sha256(path) == digest
    except OSError:
        return False


def hash_files(directory: Path, names, known: dict[str, tuple[int, str]] | None = None) -> dict[str, str]:
    """{name: sha256} of directory/name for each name. known: {name: (size, sha256)} hashed while the
    file was written (fake_params.CheckpointWeights.data_digest), taken when the file still has that size."""
    known = known or {}
    out = {}
    for n in sorted(names):
        size, digest = known.get(n, (None, None))
        out[n] = digest if size is not None and (directory / n).stat().st_size == size else file_sha256(directory / n)
    return out


@dataclass
class PreviousExport:
    """What a scan_export.json claims: the names it lists (inside the directory only) and the hashes
    recorded for them ({} for exports before the hashes)."""

    listed: set[str]
    hashes: dict[str, str]

    def proven(self, directory: Path) -> set[str]:
        """The listed names whose file is there and provably ours; the manifest itself counts as ours
        (it is what made the directory a previous export; it never names itself in `sha256`)."""
        ours = {n for n in self.listed if n in self.hashes and is_ours(directory / n, self.hashes[n])}
        return ours | ({DESCRIPTION_FILE} if (directory / DESCRIPTION_FILE).is_file() else set())


def previous_export(directory: Path) -> PreviousExport | None:
    """The claim of a previous export in `directory`, or None when it holds no export of ours."""
    desc = directory / DESCRIPTION_FILE
    if not desc.is_file() or desc.is_symlink():
        return None
    try:
        d = read_json_object(desc)
    except (OSError, ScanExportError):  # not readable as ours: no claim, and the directory is not ours to replace
        return None
    if d.get("format") != FORMAT:
        return None
    files = d.get("files", LEGACY_FILES)  # exports before the manifest wrote only these names
    hashes = d.get(HASHES)
    if not isinstance(files, list):
        return None
    hashes = {k: v for k, v in hashes.items() if plain_name(k)} if isinstance(hashes, dict) else {}
    return PreviousExport({f for f in files if plain_name(f)} | {DESCRIPTION_FILE}, hashes)


def previous_export_files(directory: Path) -> set[str] | None:
    """The names in `directory` provably written by a previous export, or None when it holds none."""
    prev = previous_export(directory)
    return None if prev is None else prev.proven(directory)


def _listing(names, limit: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class OutputPlan:
    """How an export reaches `dest`: 'create' (dest is new), 'swap' (dest is a previous export and
    holds only files provably its own: the whole directory is exchanged), or 'merge' (dest is empty,
    or holds files of the user's: ours are moved in one by one, scan_export.json last).
    previous: {name: sha256} of dest's files provably ours (removable; re-checked before removal).
    unproven: names a previous export's manifest claims without proof: replaced only by a
    byte-identical file."""

    dest: Path
    mode: str
    previous: dict = field(default_factory=dict)
    unproven: set[str] = field(default_factory=set)


def plan_output_dir(dest, *, force: bool = False, protected: dict | None = None, what: str = "output directory",
                    writes=(), copies: dict | None = None) -> OutputPlan:
    """Check `dest` before any work starts. protected: {path: reason} of directories never written
    into (the checkpoint being exported). writes: names the export certainly writes; copies: {name:
    source file} it copies in. A file of the user's under one of those names is refused now, naming
    it (a copy that is byte-identical to the user's file is fine). Raises ScanExportError naming the
    path and the way out. Also removes staging directories next to dest left by killed exports."""
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
    remove_stale_staging(dest.parent)
    if not dest.exists():
        if dest.parent.exists() and not dest.parent.is_dir():
            raise ScanExportError(f"{what} {raw!r}: its parent {str(dest.parent)!r} is a file, expected a directory")
        return OutputPlan(dest, "create")
    remove_stale_staging(dest)
    entries = {p.name for p in dest.iterdir() if not p.name.startswith(STAGING_PREFIX)}
    prev = previous_export(dest)
    if prev is None and entries and not force:
        raise ScanExportError(f"{what} {raw!r} is not empty and holds no previous export ({_listing(entries)}); "
                              f"choose a new or empty directory, or pass --force to add scan-export's files "
                              f"to it (nothing else in it is touched)")
    proven = prev.proven(dest) if prev else set()
    previous = {n: (prev.hashes.get(n) if n != DESCRIPTION_FILE else None) for n in proven}
    # Old manifests (no hashes) may still be replaced where the new file turns out byte-identical.
    unproven = (prev.listed & entries) - proven if prev and not prev.hashes else set()
    foreign = entries - proven
    copies = copies or {}
    clash = sorted(n for n in foreign - unproven if n in set(writes) | set(copies)
                   and not (n in copies and _same_bytes(dest / n, copies[n])))
    clash += sorted(n for n in unproven if n in copies and not _same_bytes(dest / n, copies[n]))
    if clash:
        raise ScanExportError(f"{what} {raw!r} holds {_listing(clash)}, which scan-export did not write "
                              f"(no matching hash in {DESCRIPTION_FILE}), where the export writes its own; "
                              f"nothing was changed: move {'them' if len(clash) > 1 else 'it'} away or choose "
                              f"another directory")
    mode = "merge" if foreign or dest == Path.cwd() else "swap"
    return OutputPlan(dest, mode, previous, unproven)


def _same_bytes(a: Path, b: Path) -> bool:
    """a and b are regular files (a not a symlink) with the same content."""
    try:
        if not stat.S_ISREG(os.lstat(a).st_mode) or a.stat().st_size != Path(b).stat().st_size:
            return False
        return file_sha256(a) == file_sha256(b)
    except OSError:
        return False


def _process_start(pid: int) -> str | None:
    """The kernel's start time of process pid (field 22 of /proc/pid/stat), None when no such process.
    With the pid it names one process: a reused pid has a later start time."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[19]


def _owner_alive(owner: dict) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if not Path("/proc/self/stat").exists():  # no /proc: only whether the pid exists (may be a reused pid)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True
    start = _process_start(pid)
    return start is not None and start == owner.get("start")


def _write_owner(staging: Path) -> None:
    (staging / OWNER_FILE).write_text(json.dumps({"written_by": "scan-export", "pid": os.getpid(),
                                                  "start": _process_start(os.getpid())}))


def remove_stale_staging(parent: Path) -> None:
    """Remove staging directories in parent that carry our owner marker and whose owner is dead
    (an export killed by SIGKILL or a power cut). Anything else named like one is left alone."""
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(STAGING_PREFIX)]
    except OSError:
        return
    for p in candidates:
        marker = p / OWNER_FILE
        try:
            if p.is_symlink() or not p.is_dir() or not stat.S_ISREG(os.lstat(marker).st_mode):
                continue
            owner = json.loads(marker.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(owner, dict) or owner.get("written_by") != "scan-export" or _owner_alive(owner):
            continue
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            print(f"scan-export: note: removed {p}, left behind by an export that was killed", file=sys.stderr)


def _staging_parent(plan: OutputPlan) -> Path:
    """The existing directory the staging directory is made in (or under, for new parents)."""
    p = plan.dest if plan.mode == "merge" else plan.dest.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_room(plan: OutputPlan, nbytes: int, *, single_file: bool, what: str = "output directory") -> None:
    """Before any work: the staging directory's parent is writable, and its file system has room
    for nbytes of export, twice over when the export is one file (model.onnx is assembled from
    model.onnx.data, both on disk until the data file goes). One line with the estimate otherwise."""
    parent = _staging_parent(plan)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ScanExportError(f"{what} {str(plan.dest)!r}: cannot write into {str(parent)!r} (read-only or "
                              f"not yours); expected a directory you can write to")
    need = 2 * nbytes if single_file else nbytes
    free = free_disk(parent)
    if free is not None and need > free:
        twice = " (twice the model: model.onnx is assembled from its data file)" if single_file else ""
        raise ScanExportError(f"{what} {str(plan.dest)!r}: the export would need {human_bytes(need)} free{twice}, "
                              f"{str(parent)!r} has {human_bytes(free)}; free some space or choose another directory")


# OSErrors that mean the output location, not a bug: reported as one line after cleaning up.
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


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


def _remove_ours(directory: Path, previous: dict) -> None:
    """Remove the files of `previous` ({name: sha256}) that are still provably ours."""
    for name, digest in previous.items():
        p = directory / name
        if name == DESCRIPTION_FILE or is_ours(p, digest):
            with contextlib.suppress(FileNotFoundError):
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
        try:
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=stage_parent))
        except OSError as e:
            for p in reversed(created):
                with contextlib.suppress(OSError):
                    p.rmdir()
            raise ScanExportError(f"output directory {str(dest)!r}: cannot write into {str(stage_parent)!r} "
                                  f"({e.strerror}); expected a directory you can write to") from None
        try:
            _write_owner(staging)
            yield staging
            (staging / OWNER_FILE).unlink()
            make_readable(staging)
            with _signals_held():
                _commit(plan, staging)
        except BaseException as e:
            shutil.rmtree(staging, ignore_errors=True)
            for p in reversed(created):
                with contextlib.suppress(OSError):
                    p.rmdir()
            if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
                raise ScanExportError(f"output directory {str(dest)!r}: {e.strerror} while writing "
                                      f"{e.filename or 'the export'}; nothing was left behind") from e
            raise


def _commit(plan: OutputPlan, staging: Path) -> None:
    dest = plan.dest
    if plan.mode == "create":
        if dest.exists():
            raise ScanExportError(f"output directory {str(dest)!r} appeared while exporting; nothing was written to it")
        os.rename(staging, dest)
        return
    if plan.mode == "swap" and _exchange(staging, dest):
        # staging now holds the previous export: remove what is still provably ours, keep the rest.
        _remove_ours(staging, plan.previous)
        with contextlib.suppress(OSError):
            staging.rmdir()
        if staging.exists():  # someone changed or added a file meanwhile: keep it where it is now, and say where
            print(f"scan-export: note: the previous export's folder kept files it did not write; they are in {staging}",
                  file=sys.stderr)
        return
    names = sorted(p.name for p in staging.iterdir())
    clash = [n for n in names if (dest / n).is_dir() and not (dest / n).is_symlink()]
    if clash:
        raise ScanExportError(f"output directory {str(dest)!r} has a folder named {clash[0]!r}, "
                              f"where the export writes a file; move it away")
    # Every file about to be replaced must be ours (its hash, checked now) or byte-identical to ours.
    foreign = [n for n in names if os.path.lexists(dest / n) and not (n == DESCRIPTION_FILE and n in plan.previous)
               and not (n in plan.previous and is_ours(dest / n, plan.previous[n]))
               and not _same_bytes(dest / n, staging / n)]
    if foreign:
        raise ScanExportError(f"output directory {str(dest)!r} holds {_listing(foreign)}, which scan-export cannot "
                              f"prove it wrote (no matching hash in {DESCRIPTION_FILE}) and which differs from the "
                              f"new export; nothing was changed: move it away or choose another directory")
    for name in names:  # the description last: until it lands, readers see the old export whole
        if name != DESCRIPTION_FILE:
            os.replace(staging / name, dest / name)
    if DESCRIPTION_FILE in names:
        os.replace(staging / DESCRIPTION_FILE, dest / DESCRIPTION_FILE)
    # e.g. model.onnx.data of a larger previous export
    _remove_ours(dest, {n: h for n, h in plan.previous.items() if n not in names})
    staging.rmdir()


def check_output_file(path, *, force: bool = False, ours=None, what: str = "--out",
                      parent_must_exist: bool = False) -> Path:
    """A single output file: refuse a directory, and an existing file unless ours(path) says we wrote
    it or force is set; parent_must_exist: refuse a path whose folder is missing (checked before a
    long run that would only fail at the end)."""
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
    if parent_must_exist and not path.parent.is_dir():
        raise ScanExportError(f"{what} {raw!r}: its folder {str(path.parent)!r} does not exist; expected a path "
                              f"in an existing folder")
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
