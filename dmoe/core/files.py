"""Files that readers may see at any moment: written whole or not at all (temp file + rename).

The temporary file is made by :func:`tempfile.mkstemp` in the target's directory: a name nobody can
guess, created with ``O_CREAT | O_EXCL`` (never an existing file, nor a symlink planted there), and
written through that descriptor; ``os.replace`` then puts it in place (replacing a symlink at the
final name, never following it).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

FILE_MODE = 0o644  # of the files written here, less the process's umask (as open() would make them)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON so that readers see either no file or the whole file (temp file + rename)."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            os.fchmod(file.fileno(), FILE_MODE & ~_umask())  # mkstemp makes it 0600
            file.write(json.dumps(data))
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it (Linux); 0o022 where it cannot be read."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022
