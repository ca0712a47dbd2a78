"""The checked-in generated code is exactly what proto/ generates."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.timeout(60)
def test_generated_code_matches_proto(tmp_path):
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True,
                   env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"})
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc wrote nothing"
    for path in generated:
        checked_in = ROOT / path
        assert checked_in.exists(), f"{path} is generated but not checked in"
        assert checked_in.read_bytes() == (tmp_path / path).read_bytes(), \
            f"{path} differs: run scripts/gen_proto.sh"
