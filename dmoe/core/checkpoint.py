"""CheckpointStore: atomic safetensors checkpoints, the last few kept per name; TrainingState, what
one checkpoint of a model in training holds: parameters, optimizer state, step, a JSON-able config.

Layout: ``<dir>/<name>/<version:012d>.safetensors`` (a node's experts by uid, a trainer's model as
``client``). A file is written under a temporary name, fsynced, and renamed into place
(then the directory is fsynced), so a kill at any moment leaves either the previous checkpoint or
the new one, never a torn file (temporary files left by a kill are removed at start-up). Loading
walks from the newest file down and skips any that does not parse.

A :class:`TrainingState` is one file (:meth:`CheckpointStore.save_state`): tensors ``model.<name>``
(the module's state_dict), ``optimizer.<parameter index>.<slot>`` (the optimizer's state per
parameter) and any others under their own names; metadata ``step``, ``model_config`` and
``param_groups`` (both JSON).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dmoe.errors import CheckpointError

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
MODEL, OPTIMIZER = "model.", "optimizer."  # prefixes of a TrainingState's tensors


@dataclass(kw_only=True, slots=True)
class TrainingState:
    model: dict[str, torch.Tensor]  # the module's state_dict
    optimizer: dict[str, Any]  # the optimizer's state_dict: "state" (tensors by parameter), "param_groups"
    step: int  # the optimizer steps that made it
    config: dict[str, Any]  # JSON-able: what the model is (a loader compares it with its own)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # anything else (a data order's RNG)

    def to_file(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, metadata) in the layout of the module docstring."""
        clash = [name for name in self.tensors if name.startswith((MODEL, OPTIMIZER))]
        if clash:
            raise ValueError(f"extra tensors may not be named {MODEL}* or {OPTIMIZER}*: {clash}")
        tensors = {MODEL + k: v.detach().cpu().contiguous() for k, v in self.model.items()}
        for index, slots in self.optimizer["state"].items():
            for slot, value in slots.items():
                tensors[f"{OPTIMIZER}{index}.{slot}"] = torch.as_tensor(value).detach().cpu().contiguous()
        tensors.update((k, v.detach().cpu().contiguous()) for k, v in self.tensors.items())
        metadata = {"step": str(self.step), "model_config": json.dumps(self.config),
                    "param_groups": json.dumps(self.optimizer["param_groups"])}
        return tensors, metadata

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> TrainingState:
        """Raises KeyError or ValueError for a file of another layout."""
        model, others = {}, {}
        optimizer: dict[str, Any] = {"state": {}, "param_groups": json.loads(metadata["param_groups"])}
        for key, value in tensors.items():
            if key.startswith(MODEL):
                model[key[len(MODEL):]] = value
            elif key.startswith(OPTIMIZER):
                index, slot = key[len(OPTIMIZER):].split(".", 1)
                optimizer["state"].setdefault(int(index), {})[slot] = value
            else:
                others[key] = value
        return cls(model=model, optimizer=optimizer, step=int(metadata["step"]),
                   config=json.loads(metadata["model_config"]), tensors=others)


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

    def save(self, uid: str, version: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
             ) -> Path:
        directory = self._dir(uid)
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / f"{version:012d}{SUFFIX}"
        fd, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{final.name}.", suffix=".tmp")
        os.close(fd)
        temp = Path(temp_name)
        try:
            save_file(tensors, str(temp), metadata=metadata)
            with open(temp, "rb") as file:
                os.fsync(file.fileno())
            os.replace(temp, final)
        except BaseException:  # a failed write (a full disk) leaves no part behind to fill it further
            temp.unlink(missing_ok=True)
            raise
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

    def save_state(self, name: str, state: TrainingState) -> Path:
        """Write ``state`` as checkpoint ``state.step`` of ``name``, atomically."""
        return self.save(name, state.step, *state.to_file())

    def load_state(self, name: str) -> tuple[TrainingState, Path] | None:
        """The newest readable TrainingState of ``name`` and its path, or None if it has none.
        Raises CheckpointError if that file is not a TrainingState."""
        loaded = self.load_latest(name)
        if loaded is None:
            return None
        tensors, metadata, path = loaded
        try:
            return TrainingState.from_file(tensors, metadata), path
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path} is not a training checkpoint ({type(e).__name__}: {e})") from None


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
