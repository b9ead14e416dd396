"""Export by Hub id, offline: the test fills a Hugging Face cache (the layout huggingface_hub reads with
HF_HUB_OFFLINE=1) with a checkpoint it saved itself, then exports `test-org/tiny-mamba` by id."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="the checkpoint is written by transformers")
pytest.importorskip("huggingface_hub")

from scan_export.tiny import make_tiny_checkpoint  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_cache(hf_home, ckpt, repo="test-org/tiny-mamba", ref="main"):
    """models--ORG--NAME/{refs/REF, snapshots/COMMIT/*}: what a download leaves behind (files kept
    as plain copies; huggingface_hub reads snapshots through its symlinks or without them)."""
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    shutil.copytree(ckpt, snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / ref).write_text(COMMIT)
    return snap


def run_cli(args, hf_home):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "scan_export.cli", *args], capture_output=True, text=True, env=env)


def test_export_by_hub_id_offline_equals_export_from_directory(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "mamba")
    fill_cache(tmp_path / "hf", ckpt)
    by_id = run_cli(["export-model", "test-org/tiny-mamba", "--out", str(tmp_path / "by-id")], tmp_path / "hf")
    assert by_id.returncode == 0, by_id.stderr
    by_dir = run_cli(["export-model", str(ckpt), "--out", str(tmp_path / "by-dir")], tmp_path / "hf")
    assert by_dir.returncode == 0, by_dir.stderr
    names = sorted(p.name for p in (tmp_path / "by-dir").iterdir())
    assert sorted(p.name for p in (tmp_path / "by-id").iterdir()) == names
    for name in names:  # the export is deterministic: the same checkpoint gives the same bytes
        assert (tmp_path / "by-id" / name).read_bytes() == (tmp_path / "by-dir" / name).read_bytes(), name
    # A revision the cache has no ref for, and an id the cache lacks: one line each, exit 2.
    bad_rev = run_cli(["export-model", "test-org/tiny-mamba", "--revision", "v9", "--out", str(tmp_path / "x")],
                      tmp_path / "hf")
    missing = run_cli(["export-model", "test-org/absent", "--out", str(tmp_path / "y")], tmp_path / "hf")
    for res, culprit in ((bad_rev, "test-org/tiny-mamba"), (missing, "test-org/absent")):
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and culprit in res.stderr, res.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_revision_on_a_local_path_is_refused(tmp_path, capsys):
    from scan_export.cli import main

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "mamba")
    assert main(["export-model", str(ckpt), "--revision", "main", "--out", str(tmp_path / "o")]) == 2
    assert "--revision" in capsys.readouterr().err and not (tmp_path / "o").exists()
