import pytest
import torch

from dmoe.lm.data import ByteCorpus, is_heldout, stdlib_root

pytestmark = pytest.mark.timeout(60)


def test_stdlib_split_is_by_file_and_fixed():
    corpus = ByteCorpus.load("stdlib")
    root = stdlib_root()
    files = [p.relative_to(root).as_posix() for p in root.rglob("*.py") if "site-packages" not in p.parts]
    heldout = [f for f in files if is_heldout(f)]
    assert 0.02 < len(heldout) / len(files) < 0.10
    assert corpus.num_files == len(files)
    assert len(corpus.heldout) < len(corpus.train) / 5
    # the same held-out windows every time
    a = corpus.heldout_batches(2, 16, 2)
    b = ByteCorpus.load("stdlib").heldout_batches(2, 16, 2)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_batches_are_next_byte_targets(tmp_path):
    text = bytes(range(32, 127)) * 50
    (tmp_path / "a.txt").write_bytes(text)
    corpus = ByteCorpus.load(str(tmp_path / "a.txt"))
    assert len(corpus.heldout) == len(text) - int(len(text) * 0.95)  # a file is split by position
    x, y = corpus.batch(3, 10, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 10) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_a_folder_reads_text_files_and_bad_sources_are_refused(tmp_path):
    for i in range(30):
        (tmp_path / f"f{i}.py").write_text(f"print({i})\n" * 20)
    (tmp_path / "image.png").write_bytes(b"\x89PNG" * 100)
    corpus = ByteCorpus.load(str(tmp_path))
    assert corpus.num_files == 30 and b"PNG" not in corpus.train.tobytes() + corpus.heldout.tobytes()
    with pytest.raises(ValueError, match="no such data"):
        ByteCorpus.load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        ByteCorpus.load(str(tmp_path / "empty"))
