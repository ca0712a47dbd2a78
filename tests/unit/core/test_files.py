"""Files written whole or not at all (dmoe.core.files), and not through a symlink someone planted."""

from __future__ import annotations

import json
import os
import stat

import pytest

from dmoe.core.files import write_json_atomic

pytestmark = pytest.mark.timeout(30)


def test_a_symlink_at_the_old_temporary_name_is_not_followed(tmp_path):
    """The ready file used to be written to ``.<name>.<pid>.tmp`` first, following a symlink there:
    whoever could write to the directory (a shared /tmp) could make a node overwrite any file of its
    user. Now a planted symlink is left alone, and so is its target."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    ready = tmp_path / "ready.json"
    planted = tmp_path / f".{ready.name}.{os.getpid()}.tmp"
    planted.symlink_to(victim)
    write_json_atomic(ready, {"endpoint": "127.0.0.1:1"})
    assert victim.read_text() == "precious"
    assert json.loads(ready.read_text()) == {"endpoint": "127.0.0.1:1"} and not ready.is_symlink()
    assert planted.is_symlink()  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([victim.name, ready.name, planted.name])


def test_a_symlink_at_the_final_name_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    ready = tmp_path / "ready.json"
    ready.symlink_to(victim)
    write_json_atomic(ready, [1, 2])
    assert victim.read_text() == "precious" and json.loads(ready.read_text()) == [1, 2]
    assert not ready.is_symlink()


def test_the_file_is_rewritten_whole_with_the_usual_mode(tmp_path):
    ready = tmp_path / "ready.json"
    write_json_atomic(ready, {"a": 1})
    write_json_atomic(ready, {"b": 2})
    assert json.loads(ready.read_text()) == {"b": 2}
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(ready.stat().st_mode) == 0o644 & ~umask  # as open() made it before
    assert [p.name for p in tmp_path.iterdir()] == ["ready.json"]  # no temporary file left
    with pytest.raises(TypeError):
        write_json_atomic(ready, {"not json": object()})
    assert json.loads(ready.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["ready.json"]
