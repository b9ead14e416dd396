"""Print (or, with --write, save) constraints.txt: the exact versions of scan-export[test,demo]'s
installed dependency closure, read from this interpreter's environment. Run it in the environment
the suite just passed in (tools/test_newest.sh --freeze does), so the file only ever names versions
that a full run passed on."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
from pathlib import Path

from packaging.requirements import Requirement

HEADER = """\
# The versions the test suite last passed on (Python 3.11, 2-core CPU machine): the README's test
# command and .ci/run install with `-c constraints.txt`, so a new upstream release cannot turn main
# red by itself. To look for drift on purpose, run the suite against the newest releases instead:
#   bash tools/test_newest.sh        (a throwaway venv; see README "Tested versions")
# When the newest releases pass, refresh this file from that run (tools/test_newest.sh --freeze).
# torch stays 2.13.0 in both: it is the CPU wheel; a newer one would be a multi-GB CUDA download.
"""
# the build backend is not a runtime dependency; pinning it would fight pip's isolated builds
SKIP = {"scan-export", "setuptools"}


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str = "scan-export", extras: tuple[str, ...] = ("test", "demo")) -> dict[str, str]:
    """{normalised name: version} of every installed distribution root[extras] needs, transitively."""
    seen: dict[str, str] = {}

    def walk(name: str, extras: tuple[str, ...]) -> None:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:  # an optional dependency whose marker excluded it
            return
        seen[_key(name)] = dist.version.split("+")[0]  # 2.13.0+cpu pins as 2.13.0 (PEP 440 local label)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (extras or ("",))):
                continue
            if _key(req.name) not in seen:
                walk(req.name, tuple(req.extras))

    walk(root, extras)
    return {k: v for k, v in sorted(seen.items()) if k not in SKIP}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", type=Path, help="write the file here instead of printing it")
    args = ap.parse_args()
    text = HEADER + "".join(f"{k}=={v}\n" for k, v in closure().items())
    if args.write:
        args.write.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
