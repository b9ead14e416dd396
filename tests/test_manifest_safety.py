"""A scan_export.json is a claim, not a proof (issue 21): forged, old and copied-in manifests never
cause a user's file to be removed or replaced; staging left by a SIGKILLed export is cleaned up.

Every test puts real user files next to the manifest and compares their sha256 before and after."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="the exports need a tiny checkpoint written by transformers")

from scan_export.cli import main  # noqa: E402
from scan_export.errors import ScanExportError  # noqa: E402
from scan_export.onnx.model_export import export_model  # noqa: E402
from scan_export.onnx.output_dir import OWNER_FILE, STAGING_PREFIX  # noqa: E402
from scan_export.contract import DESCRIPTION_FILE  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    ckpt = make_tiny_checkpoint(root / "ckpt", "mamba")
    (ckpt / "tokenizer.json").write_text('{"checkpoint": "tokenizer"}')  # copied into every export
    return {"ckpt": ckpt, "export": export_model(ckpt, root / "export")}


def sums(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def user_files(o, names=("notes.txt", "thesis.tex")):
    o.mkdir(exist_ok=True)
    for n in names:
        (o / n).write_text(f"the user's own {n}\n")
    return sums(o)


def manifest(o, files, version=4, **extra):
    """A scan_export.json of our format; files=None leaves the list out (exports before version 3)."""
    listed = {} if files is None else {"files": files}
    (o / DESCRIPTION_FILE).write_text(json.dumps({"format": "scan_export/mamba-lm", "version": version,
                                                  **listed, **extra}))


def kept(o, before):
    now = sums(o)
    return all(now.get(k) == v for k, v in before.items() if k != DESCRIPTION_FILE)


def test_forged_manifest_removes_nothing_it_lists(made, tmp_path):
    o = tmp_path / "o"
    before = user_files(o)
    manifest(o, ["notes.txt", "thesis.tex", "model.onnx"])  # no hashes: a claim with no proof
    export_model(made["ckpt"], o)
    assert kept(o, before)
    assert (o / "model.onnx").is_file() and json.loads((o / DESCRIPTION_FILE).read_text())["sha256"]


def test_forged_hashes_that_do_not_match_remove_nothing(made, tmp_path):
    o = tmp_path / "o"
    before = user_files(o)
    manifest(o, ["notes.txt", "thesis.tex"], sha256={"notes.txt": "0" * 64, "thesis.tex": "f" * 64})
    export_model(made["ckpt"], o)
    assert kept(o, before)


def test_manifest_paths_never_leave_the_directory(made, tmp_path):
    outside = tmp_path / "outside"
    before_out = user_files(outside, ("diary.txt",))
    o = tmp_path / "o"
    o.mkdir()
    os.symlink(outside / "diary.txt", o / "link.txt")
    digest = before_out["diary.txt"]
    manifest(o, [str(outside / "diary.txt"), "../outside/diary.txt", "link.txt", "sub/../x", "a\0b"],
             sha256={"link.txt": digest, str(outside / "diary.txt"): digest, "../outside/diary.txt": digest})
    export_model(made["ckpt"], o)
    assert sums(outside) == before_out and os.path.islink(o / "link.txt")


def test_old_manifest_never_replaces_a_users_tokenizer(made, tmp_path):
    """A format-2 manifest (listing nothing) with the user's own tokenizer.json and vocab.json."""
    o = tmp_path / "o"
    before = user_files(o, ("tokenizer.json", "vocab.json"))
    manifest(o, None, version=2)
    before_all = sums(o)
    with pytest.raises(ScanExportError, match="tokenizer.json"):
        export_model(made["ckpt"], o)
    assert sums(o) == before_all and kept(o, before)


def test_old_manifest_with_byte_identical_files_is_replaced(made, tmp_path):
    """An export from before the hashes (same bytes as this one writes) can still be re-exported into."""
    o = shutil.copytree(made["export"], tmp_path / "o")
    d = json.loads((o / DESCRIPTION_FILE).read_text())
    d.pop("sha256")
    (o / DESCRIPTION_FILE).write_text(json.dumps(d))
    model = (o / "model.onnx").read_bytes()
    export_model(made["ckpt"], o)
    assert (o / "model.onnx").read_bytes() == model and "sha256" in json.loads((o / DESCRIPTION_FILE).read_text())


def test_old_manifest_over_a_different_model_keeps_it(made, tmp_path):
    o = shutil.copytree(made["export"], tmp_path / "o")
    d = json.loads((o / DESCRIPTION_FILE).read_text())
    d.pop("sha256")
    (o / DESCRIPTION_FILE).write_text(json.dumps(d))
    before = sums(o)
    with pytest.raises(ScanExportError, match="model.onnx"):
        export_model(made["ckpt"], o, dtype="fp16")  # a different model.onnx: the old one is unproven
    assert sums(o) == before and not [p for p in o.iterdir() if p.name.startswith(STAGING_PREFIX)]


def test_copied_in_manifest_over_users_model_is_refused(made, tmp_path):
    """scan_export.json copied from a real export (hashes and all) next to the user's own model.onnx."""
    o = tmp_path / "o"
    before = user_files(o, ("model.onnx", "notes.txt"))
    shutil.copy(made["export"] / DESCRIPTION_FILE, o / DESCRIPTION_FILE)
    with pytest.raises(ScanExportError, match="model.onnx"):
        export_model(made["ckpt"], o)
    assert kept(o, before)


def test_force_never_replaces_a_users_model(made, tmp_path, capsys):
    o = tmp_path / "o"
    before = user_files(o, ("model.onnx",))
    assert main(["export-model", str(made["ckpt"]), "--out", str(o), "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.onnx" in err[0] and "did not write" in err[0]
    assert sums(o) == before


def test_a_file_changed_since_the_export_is_kept(made, tmp_path):
    """The user overwrote the export's tokenizer.json with their own: its hash no longer matches."""
    o = shutil.copytree(made["export"], tmp_path / "o")
    (o / "tokenizer.json").write_text("my edited tokenizer")
    before = sums(o)
    with pytest.raises(ScanExportError, match="tokenizer.json"):
        export_model(made["ckpt"], o)
    assert sums(o) == before


def test_previous_export_files_are_replaced_when_proven(made, tmp_path):
    o = shutil.copytree(made["export"], tmp_path / "o")
    (o / "model.onnx.data").write_bytes(b"ours")
    d = json.loads((o / DESCRIPTION_FILE).read_text())
    d["files"].append("model.onnx.data")
    d["sha256"]["model.onnx.data"] = hashlib.sha256(b"ours").hexdigest()
    (o / DESCRIPTION_FILE).write_text(json.dumps(d))
    export_model(made["ckpt"], o, dtype="fp16")
    assert not (o / "model.onnx.data").exists()
    assert json.loads((o / DESCRIPTION_FILE).read_text())["dtype"] == "float16"


KILL_SCRIPT = r"""
import sys, time
import scan_export.onnx.export as ex
def slow(*a, **k):
    print("STAGED", flush=True)
    time.sleep(60)
ex.export = slow
from scan_export.onnx.model_export import export_model
export_model(sys.argv[1], sys.argv[2])
"""


def test_staging_of_a_sigkilled_export_is_removed_by_the_next(made, tmp_path):
    parent = tmp_path / "exports"
    parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(made["ckpt"]), str(parent / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "STAGED", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    stale = [p for p in parent.iterdir() if p.name.startswith(STAGING_PREFIX)]
    assert len(stale) == 1 and (stale[0] / OWNER_FILE).is_file()
    # A staging-named folder that is not ours (no marker) must survive.
    foreign = parent / (STAGING_PREFIX + "mine")
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    export_model(made["ckpt"], parent / "out")
    assert sorted(p.name for p in parent.iterdir()) == sorted(["out", foreign.name])
    assert (foreign / "keep.txt").read_text() == "mine"


def test_staging_of_a_live_export_is_left_alone(made, tmp_path):
    """A marker naming a live process (this one): another export is writing there right now."""
    from scan_export.onnx.output_dir import _write_owner

    live = tmp_path / (STAGING_PREFIX + "live")
    live.mkdir()
    _write_owner(live)
    export_model(made["ckpt"], tmp_path / "out")
    assert live.is_dir()


def test_demo_refuses_a_changed_earlier_checkpoint(tmp_path, capsys):
    """demo --workdir W over an earlier demo whose checkpoint/config.json was changed since."""
    from scan_export.demo import _record_checkpoint

    w = tmp_path / "w"
    ckpt = make_tiny_checkpoint(w / "checkpoint", "mamba")
    _record_checkpoint(ckpt)
    (ckpt / "config.json").write_text('{"corrupted": true}')
    before = sums(w)
    assert main(["demo", "--workdir", str(w), "--tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0] and "--workdir" in err[0]
    assert sums(w) == before


@pytest.mark.parametrize("model_type", ["mamba", "granitemoehybrid"])
def test_hashes_taken_while_writing_are_the_files(tmp_path, model_type, monkeypatch):
    """The > 2 GB layout (model.onnx + model.onnx.data) records the data file's sha256 as the export
    wrote it (fake_params._FollowingHasher, behind the writer, with transposed weights written out of
    order and small tensors appended at the end): it must be the finished file's hash, or a later
    export could never prove that file ours. A hybrid has more weight kinds (experts, KV projections)."""
    from scan_export.onnx import output_dir

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", model_type)
    read_whole = []
    hash_whole = output_dir.file_sha256
    monkeypatch.setattr(output_dir, "file_sha256", lambda path: read_whole.append(path.name) or hash_whole(path))
    out = export_model(ckpt, tmp_path / "out", external_data_bytes=0)
    assert "model.onnx.data" not in read_whole  # its hash came from the writer (the 1% budget of issue 21)
    recorded = json.loads((out / DESCRIPTION_FILE).read_text())["sha256"]
    assert "model.onnx.data" in recorded
    for name, digest in recorded.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    # and that proof is what lets a second export replace the first
    export_model(ckpt, tmp_path / "out", external_data_bytes=0)
    assert sorted(p.name for p in out.iterdir()) == sorted(recorded) + [DESCRIPTION_FILE]
