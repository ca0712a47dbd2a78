"""Checks the import contracts of pyproject.toml ([tool.importlinter]) with import-linter.

import-linter reads a package from one folder, but dmoe.node and dmoe.coordinator live in node/ and
coordinator/ beside dmoe/ (pyproject maps them). So this copies the sources into the layout they are
installed in (dmoe/node, dmoe/coordinator) in a temporary folder and runs lint-imports there.
Exit status: lint-imports' own (0: every contract kept).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "static")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="dmoe-imports-") as tmp:
        shutil.copytree(ROOT / "dmoe", Path(tmp, "dmoe"), ignore=IGNORE)
        for name in ("node", "coordinator"):
            shutil.copytree(ROOT / name, Path(tmp, "dmoe", name), ignore=IGNORE)
        lint = Path(sys.executable).with_name("lint-imports")
        cmd = [str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"]
        return subprocess.run(cmd, cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main())
