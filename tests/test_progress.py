"""Progress bars: export-model draws them on a terminal, and nothing when stderr is piped or with --quiet."""

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from scan_export.progress import silent, terminal

pytest.importorskip("transformers", reason="the export fixture is a transformers checkpoint")
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Stage names export_model announces; any of them on stderr means a bar was drawn.
STAGES = ("loading", "tracing", "writing weights", "lowering", "optimizing", "checking", "writing model file")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # One layer: each test runs whole CLI exports in fresh interpreters.
    return make_tiny_checkpoint(tmp_path_factory.mktemp("progress") / "ckpt", "mamba", num_hidden_layers=1)


def _export(ckpt, out, *flags, tty: bool) -> tuple[int, str]:
    """Run `scan-export export-model` with stderr on a pseudo-terminal (tty) or a pipe; (rc, stderr)."""
    argv = [sys.executable, "-c", "import sys; from scan_export.cli import main; sys.exit(main(sys.argv[1:]))",
            "export-model", str(ckpt), "--out", str(out), *flags]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("TQDM_DISABLE", None)
    if not tty:
        proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, timeout=300)
        return proc.returncode, proc.stderr.decode(errors="replace")
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=secondary, env=env)
    os.close(secondary)
    chunks = []
    while True:  # read until the child closes its end (EIO on Linux), so the pty never fills up
        ready, _, _ = select.select([primary], [], [], 300)
        if not ready:
            proc.kill()
            raise TimeoutError("export-model produced nothing for 300 s")
        try:
            data = os.read(primary, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_bars_on_a_terminal(ckpt, tmp_path):
    rc, err = _export(ckpt, tmp_path / "out", tty=True)
    assert rc == 0, err
    for stage in ("loading", "tracing", "optimizing", "checking", "writing model file"):
        assert stage in err, err
    assert "100%" in err  # a finished bar, not just a title


def test_nothing_when_piped_or_quiet(ckpt, tmp_path):
    rc, err = _export(ckpt, tmp_path / "piped", tty=False)
    assert rc == 0, err
    assert not any(s in err for s in STAGES) and "\r" not in err, err
    rc, err = _export(ckpt, tmp_path / "quiet", "--quiet", tty=True)
    assert rc == 0, err
    assert not any(s in err for s in STAGES) and "\r" not in err, err


def test_terminal_is_silent_off_a_tty():
    with terminal(io.StringIO()) as progress:
        assert progress is silent
    with terminal(io.StringIO(), enabled=True) as progress:  # forced on: draws even into a buffer
        assert progress is not silent
