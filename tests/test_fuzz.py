"""Seeded fuzz (issue 21): random byte flips and truncations of config.json, the model.safetensors
header, scan_export.json and model.onnx. Every case exits 2 with one line, or runs correctly; never
a traceback, never a hang (an alarm per case), never a changed file.

Checkpoint-side cases run export-model up to the trace: torch's export is replaced by a stand-in
that raises Reached, so a mutation that leaves the checkpoint valid is recognised without spending
seconds exporting it (the export of valid checkpoints is tested everywhere else), while every
check before it (config schema, blueprint, weight headers and shapes, output plan, staging) runs.
Export-side cases run `generate` to the end: a valid result is 2 in-vocabulary tokens.
"""

from __future__ import annotations

import json
import random
import shutil
import signal

import pytest

pytest.importorskip("transformers", reason="the cases need a tiny checkpoint written by transformers")

from scan_export.cli import main  # noqa: E402
from scan_export.onnx.model_export import export_model  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402

SEED = 21
CASES = {"config.json": 80, "model.safetensors": 50, "scan_export.json": 100, "model.onnx": 60}
CASE_SECONDS = 20  # a case still running after this is a hang (the slowest valid case takes ~0.3 s)


class Reached(Exception):
    """export-model got past every check to the trace: the mutated checkpoint is valid."""


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    ckpt = make_tiny_checkpoint(root / "ckpt", "mamba")
    return {"ckpt": ckpt, "export": export_model(ckpt, root / "export")}


HOSTILE = [0, -1, 1, 3, 2**31, 10**12, 10**30, 1.5, -0.0, 1e308, True, False, None, "x", "1e-5", "", [], {}, [1, 2]]


def replace_a_value(data: bytes, rng: random.Random) -> bytes:
    """One JSON leaf (a number, string, bool or null anywhere) replaced by a hostile value: byte
    flips mostly break the syntax, this reaches the checks behind the parser."""
    doc = json.loads(data)
    leaves = []

    def walk(node):
        for k, v in (node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(v, (dict, list)) and v:
                walk(v)
            else:
                leaves.append((node, k))

    walk(doc)
    node, key = rng.choice(leaves)
    node[key] = rng.choice(HOSTILE)
    return json.dumps(doc).encode()


def mutate(data: bytes, rng: random.Random, span: int | None = None, is_json: bool = False) -> bytes:
    """1-4 byte flips, or a truncation, within the first `span` bytes (all of it by default); for a
    JSON file, half the time a value replaced instead."""
    if is_json and rng.random() < 0.5:
        return replace_a_value(data, rng)
    span = min(span or len(data), len(data))
    if rng.random() < 0.25:
        return data[: rng.randrange(span)]
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(span)] ^= rng.randint(1, 255)
    return bytes(out)


def header_span(path) -> int:
    """The safetensors header: the 8-byte length and the JSON after it."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cases():
    rng = random.Random(SEED)
    return [(target, i, rng.randrange(2**32)) for target, n in CASES.items() for i in range(n)]


@pytest.fixture
def alarm():
    def hang(*_):
        raise TimeoutError(f"a fuzz case ran past {CASE_SECONDS} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(CASE_SECONDS)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_fuzz_cases_are_enough():
    assert len(cases()) >= 250


@pytest.mark.parametrize("target,i,seed", cases(), ids=[f"{t}-{i}" for t, i, _ in cases()])
def test_fuzz(made, target, i, seed, tmp_path, capsys, monkeypatch, alarm):
    import scan_export.onnx.export as ex

    rng = random.Random(seed)
    checkpoint_side = target in ("config.json", "model.safetensors")
    root = shutil.copytree(made["ckpt" if checkpoint_side else "export"], tmp_path / "in")
    path = root / target
    path.write_bytes(mutate(path.read_bytes(), rng, header_span(path) if target == "model.safetensors" else None,
                            is_json=target.endswith(".json")))
    if checkpoint_side:
        def reached(*a, **k):
            raise Reached

        monkeypatch.setattr(ex, "export", reached)
        argv = ["export-model", str(root), "--out", str(tmp_path / "out"), "--quiet"]
    else:
        argv = ["generate", str(root), "--input-ids", "1,2,3", "--max-new-tokens", "2", "--json"]
    before = snapshot(tmp_path)
    try:
        rc = main(argv)
    except Reached:
        rc = "reached"
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert snapshot(tmp_path) == before, "a fuzz case changed files on disk (or left staging behind)"
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("scan-export: error: "), err
    elif rc == 0:  # the mutation left the export runnable: a correct-looking result
        tokens = json.loads(out)["tokens"]
        assert len(tokens) == 2 and all(0 <= t < 256 for t in tokens)
    else:
        assert rc == "reached", f"exit {rc}: {err}"
