"""ExpertCheckpoints: a node's experts in a :class:`~dmoe.core.checkpoint.CheckpointStore`.

Restored at start-up from the newest readable checkpoint of each expert; saved when they changed
since their last checkpoint, periodically (``--checkpoint-interval``) and once more at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping

from dmoe.core.checkpoint import CheckpointStore
from dmoe.errors import CheckpointError
from dmoe.node.backend import ExpertBackend

logger = logging.getLogger(__name__)


class ExpertCheckpoints:
    def __init__(self, directory: str, *, keep: int, backends: Mapping[str, ExpertBackend]):
        self.directory = directory
        self.store = CheckpointStore(directory, keep)
        self.backends = backends  # the node's experts (a mapping it fills once they are built)
        self.restored_versions: dict[str, int] = {}  # uid -> version loaded from a checkpoint at start
        self._saved_versions: dict[str, int] = {}
        self._lock = threading.Lock()  # one checkpoint writer at a time

    def restore(self) -> None:
        """Load each expert's newest checkpoint, where it has one."""
        for uid, backend in list(self.backends.items()):
            self.restore_one(uid, backend)

    def restore_one(self, uid: str, backend: ExpertBackend) -> int | None:
        """Load ``uid``'s newest checkpoint into ``backend``; its version, or None if it has none."""
        found = self.store.load_latest(uid)
        if found is None:
            return None
        tensors, metadata, path = found
        backend.load_state_tensors(tensors, metadata)
        self._saved_versions[uid] = self.restored_versions[uid] = backend.version
        logger.info("restored %s from %s (version %d)", uid, path, backend.version)
        return backend.version

    def save(self, force: bool = False) -> int:
        """Checkpoint every expert that changed since its last checkpoint (all of them if force);
        return how many were written."""
        with self._lock:
            saved, failed = 0, []
            # a snapshot: the node adds and drops experts on its loop while this runs on a thread
            for uid, backend in list(self.backends.items()):
                try:  # one expert's failure (its directory, its state) does not cost the others theirs
                    saved += self._save(uid, backend, force)
                except Exception as e:
                    logger.error("could not checkpoint %s: %s", uid, e)
                    failed.append(uid)
            if saved:
                logger.info("checkpoint written for %d experts in %s", saved, self.directory)
            if failed:
                raise CheckpointError(f"could not checkpoint {len(failed)} of {len(self.backends)} experts "
                                      f"({', '.join(failed[:8])}{', ...' if len(failed) > 8 else ''})")
            return saved

    def save_one(self, uid: str, backend: ExpertBackend) -> bool:
        """Checkpoint ``uid`` (an expert the node stops hosting) if it changed since its last one."""
        with self._lock:
            return self._save(uid, backend, False)

    def _save(self, uid: str, backend: ExpertBackend, force: bool) -> bool:
        if not force and self._saved_versions.get(uid) == backend.version:
            return False
        tensors, metadata = backend.state_tensors()
        version = int(metadata["version"])
        self.store.save(uid, version, tensors, metadata)
        self._saved_versions[uid] = version
        return True

    async def run(self, interval: float) -> None:
        """Save what changed every ``interval`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.save)
            except CheckpointError as e:  # each expert's cause is logged already
                logger.warning("periodic checkpoint: %s", e)
            except Exception:
                logger.exception("periodic checkpoint failed")
