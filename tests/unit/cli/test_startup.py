"""The CLI starts without the heavy parts: ``dmoe --help`` and ``dmoe swarm keygen`` import neither torch
nor hivemind (dmoe/__init__ exports its API lazily; configs live in modules that import neither).

Each command runs in a fresh interpreter, through click's runner inside it, and reports which of the two
were imported by the end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

PROBE = """
import json, sys
from click.testing import CliRunner
from dmoe.cli import main
result = CliRunner().invoke(main, sys.argv[1:], catch_exceptions=False)
print(json.dumps({"exit": result.exit_code, "output": result.output,
                  "torch": "torch" in sys.modules, "hivemind": "hivemind" in sys.modules}))
"""


def run_cli(*args: str, cwd=None) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=50,
                          cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_imports_neither_torch_nor_hivemind():
    seen = run_cli("--help")
    assert seen["exit"] == 0 and "Usage:" in seen["output"] and "swarm" in seen["output"]
    assert not seen["torch"] and not seen["hivemind"]


def test_keygen_imports_neither_torch_nor_hivemind(tmp_path):
    key = tmp_path / "swarm.key"
    seen = run_cli("swarm", "keygen", str(key))
    assert seen["exit"] == 0 and "swarm key written" in seen["output"]
    assert key.stat().st_size > 0 and key.stat().st_mode & 0o777 == 0o600
    assert not seen["torch"] and not seen["hivemind"]


def test_the_probe_sees_an_import_when_there_is_one():
    """The check above can fail: a command that needs torch shows it (train's option parsing is light,
    but the public API's RemoteMoE is not)."""
    done = subprocess.run([sys.executable, "-c", "import sys, dmoe; dmoe.RemoteMoE; "
                           "print('torch' in sys.modules, 'hivemind' in sys.modules)"],
                          capture_output=True, text=True, timeout=50)
    assert done.stdout.split() == ["True", "True"], done.stderr


def test_the_public_api_is_there_and_unknown_names_fail():
    done = subprocess.run([sys.executable, "-c", "import dmoe; print(sorted(dmoe.__all__)); "
                           "print(dmoe.SwarmConfig.__module__, dmoe.LocalMoE.__module__); dmoe.nothing"],
                          capture_output=True, text=True, timeout=50)
    lines = done.stdout.splitlines()
    assert lines[0] == "['LocalMoE', 'RemoteMoE', 'Swarm', 'SwarmConfig', '__version__']"
    assert lines[1] == "dmoe.client.config dmoe.moe.local"
    assert done.returncode == 1 and "AttributeError: module 'dmoe' has no attribute 'nothing'" in done.stderr
