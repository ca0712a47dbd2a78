"""Markers shared by the test files: the one rule for tests that need what not every machine has."""

from __future__ import annotations

import os

import pytest

# Tests that make network namespaces or shape links (ip netns, tc) need root. Without it they are
# skipped, with this reason in pytest's summary (-ra), never failed; the suite runs as root in CI.
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: it makes network namespaces and shapes links (ip netns, tc)")
