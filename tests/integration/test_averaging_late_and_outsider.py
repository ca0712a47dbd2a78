"""Trainers' averaging in a private swarm (README: "A trainer that joins late first loads the
averaged parameters from a peer"; docs/security.md: outsiders cannot "find the trainers' averaging
groups"), with real averagers (hivemind's, over libp2p) on DHT peers holding the key, in a process
of their own (tests/support/late_averager.py: the averagers fork, which must come before any thread)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from swarm_fixtures import HERE

from dmoe.core.auth import SwarmKey

pytestmark = pytest.mark.timeout(180)


def test_a_late_member_loads_the_average_and_an_outsider_cannot_find_the_averagers(tmp_path):
    SwarmKey.generate(tmp_path / "swarm.key")
    proc = subprocess.run([sys.executable, str(HERE / "late_averager.py"), str(tmp_path / "swarm.key")],
                          capture_output=True, text=True, timeout=150, stdin=subprocess.DEVNULL, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    averaged, late = result["averaged"], result["late"]
    assert averaged == {"a": [2.0], "b": [2.0], "outcomes": {"a": True, "b": True}}, averaged
    # the late member starts from the members' average (1.0 and 3.0), not from its own 7.0
    assert (late["before"], late["loaded"], late["after"]) == ([7.0], True, [2.0]), late
    # a member finds the averagers in the DHT (itself among them, once it has joined); an outsider
    # cannot even join the DHT where they are
    assert set(late["members"]) < set(late["found"]) and len(late["found"]) == 3, late
    assert result["outsider"].startswith("refused: none of the swarm peers"), result["outsider"]
    assert "private swarm answers only peers holding its key" in result["outsider"]
