import json

import pytest
import torch

from dmoe.core.checkpoint import CheckpointStore, TrainingState, scan_checkpoints
from dmoe.errors import CheckpointError
from dmoe.node.backend import ExpertBackend
from dmoe.node.config import NodeConfig
from dmoe.node.experts import build_backend

pytestmark = pytest.mark.timeout(60)


def backend(uid: str = "ffn.0", hidden: int = 8) -> ExpertBackend:
    return build_backend(uid, NodeConfig(expert_cls="ffn", hidden_dim=hidden, lr=1e-2), torch.device("cpu"))


def test_roundtrip_restores_parameters_optimizer_and_version(tmp_path):
    trained = backend()
    for _ in range(3):
        x = torch.randn(4, 8)
        trained.backward([x], [torch.ones(4, 8)])
    store = CheckpointStore(tmp_path, keep=2)
    tensors, metadata = trained.state_tensors()
    store.save("ffn.0", trained.version, tensors, metadata)

    restored = backend()
    found = store.load_latest("ffn.0")
    assert found is not None
    restored.load_state_tensors(found[0], found[1])
    assert restored.version == 3
    x, g = torch.randn(4, 8), torch.randn(4, 8)
    # same parameters and the same Adam moments: the next step matches exactly
    torch.testing.assert_close(restored.backward([x], [g]), trained.backward([x], [g]), rtol=0, atol=0)
    torch.testing.assert_close(restored.forward([x]), trained.forward([x]), rtol=0, atol=0)


def test_keeps_the_last_few_and_skips_a_torn_file(tmp_path):
    b = backend()
    store = CheckpointStore(tmp_path, keep=2)
    for version in (1, 2, 3):
        b.version = version
        store.save("ffn.0", version, *b.state_tensors())
    names = [p.name for p in store.checkpoints("ffn.0")]
    assert names == ["000000000002.safetensors", "000000000003.safetensors"]
    (tmp_path / "ffn.0" / "000000000004.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    (tmp_path / "ffn.0" / ".000000000005.safetensors.123.tmp").write_bytes(b"half")
    found = store.load_latest("ffn.0")
    assert found is not None and found[2].name == "000000000003.safetensors"
    assert store.load_latest("ffn.9") is None


def test_a_checkpoint_of_another_expert_is_refused(tmp_path):
    store = CheckpointStore(tmp_path, keep=1)
    store.save("ffn.0", 0, *backend("ffn.0").state_tensors())
    tensors, metadata, _ = store.load_latest("ffn.0")
    with pytest.raises(CheckpointError, match="cannot load"):
        backend("ffn.1").load_state_tensors(tensors, metadata)
    with pytest.raises(CheckpointError, match="does not fit"):
        backend("ffn.0", hidden=16).load_state_tensors(tensors, metadata)


def test_config_hyperparameters_win_over_the_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path, keep=1)
    store.save("ffn.0", 0, *backend("ffn.0").state_tensors())
    tensors, metadata, _ = store.load_latest("ffn.0")
    faster = build_backend("ffn.0", NodeConfig(hidden_dim=8, lr=0.5), torch.device("cpu"))
    faster.load_state_tensors(tensors, metadata)
    assert faster.optimizer.param_groups[0]["lr"] == 0.5
    sgd = build_backend("ffn.0", NodeConfig(hidden_dim=8, optimizer="sgd"), torch.device("cpu"))
    with pytest.raises(CheckpointError, match="adam cannot load into ffn.0/ffn/sgd"):
        sgd.load_state_tensors(tensors, metadata)


def test_only_the_writer_removes_temporary_files(tmp_path):
    """A reader (dmoe infer, a test) opening the directory of a running trainer or node must not
    delete the file the writer is writing; the writer, at its start, removes what a kill left."""
    (tmp_path / "ffn.0").mkdir()
    in_progress = tmp_path / "ffn.0" / ".000000000007.safetensors.abc.tmp"
    in_progress.write_bytes(b"being written")
    assert CheckpointStore(tmp_path, keep=1, writer=False).load_latest("ffn.0") is None
    assert in_progress.exists()
    CheckpointStore(tmp_path, keep=1)
    assert not in_progress.exists()


def test_scan_reads_every_file_and_names_the_torn_ones(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    for uid in ("ffn.0", "ffn.1"):
        for version in (1, 2):
            store.save(uid, version, {"w": torch.full((64,), float(version))}, {"version": str(version)})
    (tmp_path / "ffn.1" / ".000000000003.safetensors.x.tmp").write_bytes(b"half a write")  # ignored
    assert scan_checkpoints(tmp_path) == ({"ffn.0": 2, "ffn.1": 2}, [])
    newest = tmp_path / "ffn.1" / "000000000002.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])  # torn: what an atomic write never leaves
    versions, corrupt = scan_checkpoints(tmp_path)
    assert versions == {"ffn.0": 2, "ffn.1": 1} and len(corrupt) == 1 and str(newest) in corrupt[0]
    assert scan_checkpoints(tmp_path / "missing") == ({}, [])


def trained_model(steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(3, 4)).square().sum().backward()
        optimizer.step()
    return model, optimizer


def test_a_training_state_round_trips_and_the_next_step_matches(tmp_path):
    model, optimizer = trained_model(3)
    rng = torch.Generator().manual_seed(5)
    store = CheckpointStore(tmp_path, keep=2)
    path = store.save_state("client", TrainingState(
        model=model.state_dict(), optimizer=optimizer.state_dict(), step=3,
        config={"width": 8, "act": "gelu"}, tensors={"rng.data": rng.get_state()}))
    assert path.name == "000000000003.safetensors"

    loaded, found = store.load_state("client")
    assert found == path and loaded.step == 3 and loaded.config == {"width": 8, "act": "gelu"}
    restored, restored_optimizer = trained_model(0)
    restored.load_state_dict(loaded.model)
    restored_optimizer.load_state_dict(loaded.optimizer)
    restored_rng = torch.Generator()
    restored_rng.set_state(loaded.tensors["rng.data"])
    for m, opt, gen in ((model, optimizer, rng), (restored, restored_optimizer, restored_rng)):
        opt.zero_grad()
        m(torch.randn(3, 4, generator=gen)).square().sum().backward()
        opt.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert store.load_state("other") is None


def test_a_training_state_reads_the_layout_trainers_have_written(tmp_path):
    """Checkpoints of dmoe train --save (read by --resume and dmoe infer) keep their layout."""
    store = CheckpointStore(tmp_path, keep=2)
    groups = [{"lr": 0.01, "betas": [0.9, 0.999], "params": [0]}]
    tensors = {"model.w": torch.ones(2), "optimizer.0.exp_avg": torch.zeros(2),
               "optimizer.0.step": torch.tensor(7.0), "rng.data": torch.arange(4, dtype=torch.uint8)}
    metadata = {"step": "7", "model_config": json.dumps({"d_model": 2}), "param_groups": json.dumps(groups)}
    store.save("client", 7, tensors, metadata)
    state, _ = store.load_state("client")
    assert state.step == 7 and state.config == {"d_model": 2} and list(state.model) == ["w"]
    assert state.optimizer["param_groups"] == groups
    assert set(state.optimizer["state"][0]) == {"exp_avg", "step"}
    assert list(state.tensors) == ["rng.data"]
    again, again_metadata = state.to_file()
    assert set(again) == set(tensors) and again_metadata == metadata


def test_a_checkpoint_of_another_kind_is_not_taken_for_a_training_state(tmp_path):
    store = CheckpointStore(tmp_path, keep=1)
    store.save("client", 0, *backend("ffn.0").state_tensors())  # an expert's: no step, no param groups
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        store.load_state("client")
    model, optimizer = trained_model(1)
    with pytest.raises(ValueError, match="may not be named"):
        store.save_state("client", TrainingState(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                                 step=1, config={}, tensors={"model.extra": torch.ones(1)}))


def test_a_failed_write_leaves_no_partial_file_and_keeps_the_checkpoints_before_it(tmp_path):
    """A write that fails half-way (a full disk; here a tensor safetensors refuses) took its temporary
    file with it no more: it stayed until a restart, one more each periodic pass that failed."""
    store = CheckpointStore(tmp_path, keep=2)
    tensors, metadata = backend().state_tensors()
    kept = store.save("ffn.0", 1, tensors, metadata)
    with pytest.raises(ValueError, match="contiguous"):
        store.save("ffn.0", 2, {"w": torch.randn(4, 6).t()}, {"version": "2"})
    assert sorted(p.name for p in (tmp_path / "ffn.0").iterdir()) == [kept.name]
    assert store.load_latest("ffn.0")[2] == kept


def test_a_checkpoint_pass_writes_every_expert_it_can_and_names_those_it_could_not(tmp_path, caplog):
    """One expert whose checkpoint cannot be written (its directory is taken by a file) ended the pass, so
    the experts after it were not saved either; now each is tried, and the pass then raises naming it."""
    from dmoe.node.checkpoints import ExpertCheckpoints

    experts = {uid: backend(uid) for uid in ("ffn.0", "ffn.1", "ffn.2")}
    (tmp_path / "ffn.1").write_text("not a directory")
    checkpoints = ExpertCheckpoints(str(tmp_path), keep=2, backends=experts)
    with pytest.raises(CheckpointError, match=r"could not checkpoint 1 of 3 experts \(ffn\.1\)"):
        checkpoints.save(force=True)
    assert [uid for uid in experts if checkpoints.store.load_latest(uid)] == ["ffn.0", "ffn.2"]
    assert "could not checkpoint ffn.1" in caplog.text
    (tmp_path / "ffn.1").unlink()
    assert checkpoints.save() == 1  # the others are unchanged since; ffn.1 is written now
