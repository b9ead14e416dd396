"""Exports never lose a user's file: the reproductions from issue 9, the replace rules, signals, modes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers", reason="the exports need a tiny checkpoint written by transformers")

from scan_export.errors import ScanExportError  # noqa: E402
from scan_export.onnx.model_export import export_model  # noqa: E402
from scan_export.onnx.output_dir import STAGING_PREFIX  # noqa: E402
from scan_export.contract import DESCRIPTION_FILE  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("safety") / "ckpt", "mamba")


def files(root):
    """{relative path: bytes} of every file under root, hidden ones included."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def no_staging_left(*dirs):
    return not [p for d in dirs for p in d.rglob("*") if p.name.startswith((STAGING_PREFIX, "."))]


def test_nonempty_foreign_dir_is_refused_and_untouched(ckpt, tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    (w / "notes.txt").write_text("x\n")
    before = files(tmp_path)
    with pytest.raises(ScanExportError, match="not empty"):
        export_model(ckpt, w)
    assert files(tmp_path) == before


def test_force_adds_our_files_and_touches_nothing_else(ckpt, tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    (w / "notes.txt").write_text("x\n")
    (w / "sub").mkdir()
    (w / "sub" / "data.bin").write_bytes(b"\0\1")
    export_model(ckpt, w, force=True)
    assert (w / "notes.txt").read_text() == "x\n" and (w / "sub" / "data.bin").read_bytes() == b"\0\1"
    assert (w / "model.onnx").is_file() and (w / DESCRIPTION_FILE).is_file()
    assert no_staging_left(w)


def test_checkpoint_dir_as_out_is_refused_even_with_force(ckpt, tmp_path):
    c = shutil.copytree(ckpt, tmp_path / "c")
    before = files(c)
    for force in (False, True):
        with pytest.raises(ScanExportError, match="checkpoint directory"):
            export_model(c, c, force=force)
    assert files(c) == before


def test_regular_file_as_out_is_refused(ckpt, tmp_path):
    f = tmp_path / "afile.txt"
    f.write_text("mine")
    with pytest.raises(ScanExportError, match="existing file"):
        export_model(ckpt, f)
    assert f.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]


def test_empty_dir_is_filled_and_new_dir_created(ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    export_model(ckpt, tmp_path / "empty")
    export_model(ckpt, tmp_path / "a" / "b" / "new")
    for d in (tmp_path / "empty", tmp_path / "a" / "b" / "new"):
        desc = json.loads((d / DESCRIPTION_FILE).read_text())
        assert sorted(desc["files"]) == sorted(p.name for p in d.iterdir())
    assert no_staging_left(tmp_path)


def test_previous_export_is_replaced_and_only_its_files_removed(ckpt, tmp_path):
    out = tmp_path / "out"
    export_model(ckpt, out)
    (out / "README-mine.md").write_text("keep me")
    # A file the previous export listed (with its hash) but this one won't write: it must go (it was ours).
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    (out / "model.onnx.data").write_bytes(b"stale weights")
    desc["files"].append("model.onnx.data")
    desc["sha256"]["model.onnx.data"] = hashlib.sha256(b"stale weights").hexdigest()
    (out / DESCRIPTION_FILE).write_text(json.dumps(desc))
    old_model = (out / "model.onnx").stat().st_mtime_ns
    time.sleep(0.01)
    export_model(ckpt, out, dtype="fp16")
    assert (out / "README-mine.md").read_text() == "keep me"
    assert not (out / "model.onnx.data").exists()
    assert (out / "model.onnx").stat().st_mtime_ns != old_model
    assert json.loads((out / DESCRIPTION_FILE).read_text())["dtype"] == "float16"
    assert no_staging_left(out)


def test_previous_export_alone_is_swapped_whole(ckpt, tmp_path):
    out = tmp_path / "out"
    export_model(ckpt, out)
    export_model(ckpt, out, dtype="fp16")
    assert json.loads((out / DESCRIPTION_FILE).read_text())["dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing hidden next to it


def test_exports_are_readable_by_other_users(ckpt, tmp_path):
    """0644 files and 0755 folders under umask 022 (mkdtemp alone would give 0700)."""
    old = os.umask(0o022)
    try:
        out = export_model(ckpt, tmp_path / "pub")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}


def test_a_failed_export_leaves_nothing(ckpt, tmp_path, monkeypatch):
    """An error half-way (here: while writing the description) removes the staging directory and
    the parents it created."""
    import scan_export.onnx.model_export as me

    def boom(*a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(me, "describe", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        export_model(ckpt, tmp_path / "x" / "y")
    assert list(tmp_path.iterdir()) == []


SIGNAL_SCRIPT = r"""
import sys, time
import scan_export.onnx.export as ex
def slow(*a, **k):  # stands in for the trace: the signal arrives while the staging directory exists
    print("STAGED", flush=True)
    time.sleep(60)
ex.export = slow
from scan_export.cli import main
sys.exit(main(["export-model", sys.argv[1], "--out", sys.argv[2]]))
"""


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_signal_during_export_cleans_up(ckpt, tmp_path, signum, code):
    """A real signal to a real process, sent while the staging directory holds a written model."""
    parent = tmp_path / "exports"
    parent.mkdir()
    (parent / "keep.txt").write_text("mine")
    proc = subprocess.Popen([sys.executable, "-c", SIGNAL_SCRIPT, str(ckpt), str(parent / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "STAGED", proc.stderr.read()
        assert [p for p in parent.iterdir() if p.name.startswith(STAGING_PREFIX)], "no staging seen"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in parent.iterdir()) == ["keep.txt"]
    assert (parent / "keep.txt").read_text() == "mine"


def test_scan_out_never_overwrites_a_foreign_file(tmp_path):
    from scan_export.cli import main

    mine = tmp_path / "mine.onnx"
    mine.write_text("not a model")
    assert main(["scan", "--out", str(mine)]) == 2
    assert mine.read_text() == "not a model"
    ours = tmp_path / "ours.onnx"
    assert main(["scan", "--out", str(ours)]) == 0
    assert main(["scan", "--dim", "8", "--out", str(ours)]) == 0  # ours: replaced without --force
    assert main(["scan", "--out", str(mine), "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.onnx", "ours.onnx"]
    assert stat.S_IMODE(ours.stat().st_mode) == 0o666 & ~_umask()


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m
