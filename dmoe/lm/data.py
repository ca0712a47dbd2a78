"""Byte-level text data for the language model: a file, a folder, or the Python standard library.

``stdlib`` is the default every machine has without a download: the ``.py`` files of the running
interpreter's standard library (not site-packages). A folder is split into train and held-out
parts by file (a file is held out when a hash of its relative path says so, about 1 in 20), so the
split is the same on every machine and every run; a single file is split by position (its last
5%). Batches are random windows of ``seq_len + 1`` bytes drawn with the caller's generator; the
held-out loss is measured on fixed windows, the same ones every time.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import numpy as np
import torch

VOCAB_SIZE = 256
HELDOUT_EVERY = 20  # one file in about this many is held out
TEXT_SUFFIXES = frozenset({".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".toml", ".cfg", ".ini",
                           ".html", ".js", ".css", ".sh", ".yaml", ".yml", ".csv", ".tex"})


def is_heldout(relative_path: str) -> bool:
    return zlib.crc32(relative_path.encode()) % HELDOUT_EVERY == 0


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


class ByteCorpus:
    """Train and held-out bytes of a corpus: ``ByteCorpus.load('stdlib')`` or a path."""

    def __init__(self, train: np.ndarray, heldout: np.ndarray, name: str, num_files: int):
        if len(train) < 2 or len(heldout) < 2:
            raise ValueError(f"{name}: too little text to train on and to hold out")
        self.train, self.heldout, self.name, self.num_files = train, heldout, name, num_files

    @classmethod
    def load(cls, source: str) -> ByteCorpus:
        if source == "stdlib":
            root = stdlib_root()
            files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
            return cls._from_files(root, files, "stdlib")
        path = Path(source).expanduser()
        if path.is_file():
            data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
            cut = int(len(data) * 0.95)
            return cls(data[:cut], data[cut:], str(path), 1)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise ValueError(f"no text files ({', '.join(sorted(TEXT_SUFFIXES))}) under {path}")
            return cls._from_files(path, files, str(path))
        raise ValueError(f"no such data: {source!r} (give 'stdlib', a text file or a folder)")

    @classmethod
    def _from_files(cls, root: Path, files: list[Path], name: str) -> ByteCorpus:
        parts: dict[bool, list[bytes]] = {False: [], True: []}
        for path in files:
            parts[is_heldout(path.relative_to(root).as_posix())].append(path.read_bytes())
        if not parts[True]:  # too few files for the hash to pick one: hold out the last
            parts[True].append(parts[False].pop())
        join = lambda chunks: np.frombuffer(b"\n".join(chunks), dtype=np.uint8)  # noqa: E731
        return cls(join(parts[False]), join(parts[True]), name, len(files))

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator, *, split: str = "train"
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: inputs [B, T] and next-byte targets [B, T], int64."""
        data = self.train if split == "train" else self.heldout
        if len(data) <= seq_len + 1:
            raise ValueError(f"{self.name}: the {split} part is shorter than seq_len + 1 = {seq_len + 1} "
                             "bytes")
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator).tolist()
        return self._windows(data, starts, seq_len)

    def heldout_batches(self, batch_size: int, seq_len: int, num_batches: int
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed held-out windows, the same every call (for comparable held-out losses)."""
        generator = torch.Generator().manual_seed(1234)
        return [self.batch(batch_size, seq_len, generator, split="heldout") for _ in range(num_batches)]

    @staticmethod
    def _windows(data: np.ndarray, starts: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(tokens: list[int]) -> str:
    return bytes(tokens).decode("utf-8", errors="replace")
