"""The dashboard as a browser renders it: headless Chromium (Debian's package, installed by
scripts/test.sh) running the page's scripts in virtual time."""

from __future__ import annotations

import shutil
import subprocess
import tempfile


def rendered_page(url: str, virtual_ms: int = 3000) -> str:
    """The page's DOM after ``virtual_ms`` of Chromium's virtual time (it runs as fast as the page's timers
    let it, and stops while a fetch is in flight)."""
    chromium = shutil.which("chromium")
    assert chromium, "Chromium is missing: scripts/test.sh installs Debian's chromium package"
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--virtual-time-budget={virtual_ms}", "--dump-dom", url],
            capture_output=True, timeout=60, text=True,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout
