"""CheckpointStore: atomic safetensors checkpoints of experts, the last few kept per expert.

Layout: ``<dir>/<uid>/<version:012d>.safetensors``. A file is written under a temporary name,
fsynced, and renamed into place (then the directory is fsynced), so a kill at any moment leaves
either the previous checkpoint or the new one, never a torn file (temporary files left by a kill are removed at start-up). Loading walks from the newest
file down and skips any that does not parse.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"


class CheckpointStore:
    def __init__(self, root: str | os.PathLike, keep: int, *, writer: bool = True):
        """``writer``: this process owns the directory; it removes the temporary files a kill left.
        A reader (``writer=False``) must not: the writer may be writing one right now."""
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.root, self.keep = Path(root), keep
        if writer:
            self.root.mkdir(parents=True, exist_ok=True)
            for leftover in self.root.glob("*/.*.tmp"):  # a write cut short by a kill
                leftover.unlink(missing_ok=True)

    def _dir(self, uid: str) -> Path:
        return self.root / uid

    def checkpoints(self, uid: str) -> list[Path]:
        """Complete checkpoint files of uid, oldest first."""
        directory = self._dir(uid)
        if not directory.is_dir():
            return []
        return sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX) and p.stem.isdigit())

    def save(self, uid: str, version: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        directory = self._dir(uid)
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / f"{version:012d}{SUFFIX}"
        fd, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{final.name}.", suffix=".tmp")
        os.close(fd)
        temp = Path(temp_name)
        save_file(tensors, str(temp), metadata=metadata)
        with open(temp, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temp, final)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        for old in self.checkpoints(uid)[: -self.keep]:
            old.unlink(missing_ok=True)
        return final

    def load_latest(self, uid: str) -> tuple[dict[str, torch.Tensor], dict[str, str], Path] | None:
        """Tensors, metadata and path of the newest readable checkpoint of uid, or None."""
        for path in reversed(self.checkpoints(uid)):
            try:
                with safe_open(str(path), framework="pt") as file:
                    metadata = dict(file.metadata() or {})
                    tensors = {name: file.get_tensor(name) for name in file.keys()}
                return tensors, metadata, path
            except (SafetensorError, OSError, ValueError) as e:
                logger.warning("skipping unreadable checkpoint %s: %s", path, e)
        return None


def scan_checkpoints(root: Path) -> tuple[dict[str, int], list[str]]:
    """(newest version by uid, files that do not parse) of a checkpoint directory: every complete
    file is opened and read in full (temporary files of writes cut short are not complete files)."""
    newest: dict[str, int] = {}
    corrupt: list[str] = []
    if not root.is_dir():
        return newest, corrupt
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(directory.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as file:
                    for name in file.keys():
                        file.get_tensor(name)
            except Exception as e:  # noqa: BLE001 - any failure to read is a corrupt file
                corrupt.append(f"{path}: {e}")
                continue
            if path.stem.isdigit():
                newest[directory.name] = max(newest.get(directory.name, -1), int(path.stem))
    return newest, corrupt
