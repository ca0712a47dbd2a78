"""The model spec (dmoe.core.modelspec): its TOML form, what readers refuse, the check of a node's
explicit options, and the owned record in the DHT (no peer but its publisher can replace it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dmoe.core.modelspec import (
    MAX_SPEC_EXPERTS,
    MODELS_KEY,
    ExpertGrid,
    ModelSpec,
    expert_schema,
    resolve,
)

pytestmark = pytest.mark.timeout(120)

SPEC_TOML = """
name = "tiny"
experts = ["tiny0.[0:4]", "tiny1.[0:2].[0:3]"]
hidden_dim = 8
inner_dim = 16
optimizer = "sgd"
lr = 0.01
version = 3
"""


def spec(**changes) -> ModelSpec:
    values = {"name": "tiny", "experts": ["tiny0.[0:4]"], "hidden_dim": 8, "inner_dim": 16, **changes}
    return ModelSpec.from_values(values)


def test_toml_round_trip(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(SPEC_TOML)
    read = ModelSpec.from_toml(str(path))
    assert read.patterns == ["tiny0.[0:4]", "tiny1.[0:2].[0:3]"]
    assert read.uids[:5] == ["tiny0.0", "tiny0.1", "tiny0.2", "tiny0.3", "tiny1.0.0"] and len(read.uids) == 10
    assert (read.expert_cls, read.hidden_dim, read.inner_dim, read.dtype) == ("ffn", 8, 16, "float32")
    assert (read.optimizer, read.lr, read.max_grad_norm, read.seed, read.version) == ("sgd", 0.01, 1.0, 0, 3)
    assert read.expert_schema == "ffn/h8/i16/float32" == expert_schema("ffn", 8, 16)
    # what the DHT carries (a msgpack-able dict) reads back the same
    assert ModelSpec.model_validate(read.model_dump()) == read


def test_inner_dim_defaults_to_four_times_hidden():
    assert ModelSpec.from_values({"name": "m", "experts": ["m.[0:2]"], "hidden_dim": 8}).inner_dim == 32
    assert expert_schema("ffn", 8, None) == "ffn/h8/i32/float32"


@pytest.mark.parametrize("changes, reason", [
    ({"name": "a b"}, "model name"),
    ({"name": "x" * 65}, "model name"),
    ({"experts": []}, "grids"),
    ({"experts": ["tiny0.[0:4]", "tiny0.[0:2]"]}, "prefix names two grids"),
    ({"experts": ["tiny0.[2:4]"]}, "grids are written"),
    ({"experts": ["tiny0.3"]}, "grids are written"),
    ({"experts": ["0bad.[0:4]"]}, "uid prefix"),
    ({"experts": ["t.[0:2].[0:2].[0:2].[0:2].[0:2]"]}, "dimensions"),
    ({"experts": ["t.[0:4097]"]}, "dimensions"),
    ({"experts": ["a.[0:4096].[0:16]", "b.[0:2]"]}, f"more than {MAX_SPEC_EXPERTS}"),
    ({"expert_cls": "os:system"}, "expert_cls"),
    ({"hidden_dim": 0}, "hidden_dim"),
    ({"hidden_dim": 1 << 17}, "hidden_dim"),
    ({"dtype": "float16"}, "dtype"),
    ({"optimizer": "lion"}, "optimizer"),
    ({"lr": 0.0}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"lr": 100.0}, "lr"),
    ({"max_grad_norm": -1.0}, "max_grad_norm"),
    ({"seed": -1}, "seed"),
    ({"colour": "red"}, "unknown key"),
])
def test_bad_specs_are_refused_with_the_reason(changes, reason):
    with pytest.raises(ValueError, match=reason):
        spec(**changes)


def test_a_record_from_a_peer_is_checked_as_a_spec_made_here():
    good = spec().model_dump()
    assert ModelSpec.model_validate({**good, "field_of_a_newer_version": 1}) == spec()
    for bad in ({"experts": [{"prefix": "t", "grid": [0]}]}, {"experts": [{"prefix": "t", "grid": [1] * 5}]},
                {"hidden_dim": -3}, {"expert_cls": "module:Class"}, {"updated_at": float("inf")}):
        with pytest.raises(ValueError):
            ModelSpec.model_validate({**good, **bad})


def test_grid_patterns():
    assert ExpertGrid.from_pattern("ffn.[0:4].[0:2]") == ExpertGrid(prefix="ffn", grid=[4, 2])
    assert ExpertGrid(prefix="ffn", grid=[4, 2]).pattern == "ffn.[0:4].[0:2]"


def test_conflicts_name_both_values_and_only_explicit_options():
    from dmoe.node.config import NodeConfig

    config = NodeConfig(hidden_dim=16, inner_dim=None, lr=0.5)
    assert spec().conflicts(config, given=()) == []
    lines = spec().conflicts(config, given={"hidden_dim", "inner_dim", "lr"})
    assert lines == ["--hidden-dim 16 disagrees with model 'tiny', whose hidden_dim is 8",
                     "--inner-dim 64 disagrees with model 'tiny', whose inner_dim is 16",
                     "--lr 0.5 disagrees with model 'tiny', whose lr is 0.001"]
    agreeing = NodeConfig(hidden_dim=8, inner_dim=16)
    assert spec().conflicts(agreeing, given={"hidden_dim", "inner_dim", "expert_cls"}) == []


def test_resolve_picks_the_named_or_only_model_and_lists_the_others():
    one, two = spec(), spec(name="other")
    assert resolve({"tiny": one}, None) is one
    assert resolve({"tiny": one, "other": two}, "other") is two
    with pytest.raises(ValueError, match=r"several models \(other, tiny\): choose one with --model"):
        resolve({"tiny": one, "other": two}, None)
    with pytest.raises(ValueError, match=r"no model 'nope' \(published: other, tiny\)"):
        resolve({"tiny": one, "other": two}, "nope")
    with pytest.raises(ValueError, match="publishes no model"):
        resolve({}, None)
    # several trainers of one model publish the same spec, each under its own key: one to follow
    same = one.model_copy(update={"owner": "b" * 43, "updated_at": 5.0})
    assert resolve({"tiny@aaaaaaaa": one, "tiny@bbbbbbbb": same}, "tiny") is one
    with pytest.raises(ValueError, match=r"several owners, differently \(tiny@aaaaaaaa, tiny@bbbbbbbb\)"):
        resolve({"tiny@aaaaaaaa": one, "tiny@bbbbbbbb": spec(hidden_dim=16)}, "tiny")


def test_the_module_imports_neither_torch_nor_hivemind():
    code = ("import sys, dmoe.core.modelspec; "
            "print(sorted(m for m in ('torch', 'hivemind') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_the_owned_record_cannot_be_replaced_by_another_peer():
    """Published by one peer, read by another; a third, with a key of its own, can store the name only
    under its own subkey (readers then list both claims), never replace or sign the publisher's."""
    from hivemind.utils import get_dht_time

    from dmoe.core.dht import DHTPeer
    from dmoe.core.modelspec import find_specs, store_spec, store_spec_async
    from dmoe.core.owner import owned_subkey

    publisher = DHTPeer().start()
    peers = [publisher]
    try:
        reader = DHTPeer(initial_peers=publisher.visible_maddrs).start()
        peers.append(reader)
        assert store_spec(publisher, spec(version=1))
        found = find_specs(reader)
        assert set(found) == {"tiny"} and found["tiny"].owner == publisher.owner.owner_id
        assert found["tiny"].hidden_dim == 8 and found["tiny"].updated_at > 0

        hostile = DHTPeer(initial_peers=publisher.visible_maddrs).start()
        peers.append(hostile)
        forged = spec(hidden_dim=4096, inner_dim=4096).model_dump() | {"owner": publisher.owner.owner_id}
        later = get_dht_time() + 200
        # under the publisher's subkey: the hostile peer cannot sign it, so every peer refuses it
        stored = hostile.run(hostile.node.store(MODELS_KEY, forged, later,
                                                subkey=owned_subkey("tiny", publisher.owner.owner_id)), 30)
        assert not stored
        assert find_specs(reader)["tiny"].hidden_dim == 8
        # under its own subkey: stored, and readers see two claims of the name, neither hiding the other
        assert hostile.run(store_spec_async(hostile.node, spec(hidden_dim=4096, inner_dim=4096), later), 30)
        claims = find_specs(reader)
        assert sorted(claims) == sorted(f"tiny@{peer.owner.owner_id[:8]}" for peer in (publisher, hostile))
        assert claims[f"tiny@{publisher.owner.owner_id[:8]}"].hidden_dim == 8
        with pytest.raises(ValueError, match="several owners"):
            resolve(claims, "tiny")
    finally:
        for peer in reversed(peers):
            peer.shutdown()


def test_a_node_config_with_a_model_needs_a_swarm_and_knows_its_explicit_options():
    from dmoe.config import given_fields
    from dmoe.errors import ConfigError
    from dmoe.node.config import NodeConfig, explicit_fields

    with pytest.raises(ConfigError, match="--model follows a model published in a swarm: give --swarm"):
        NodeConfig(model="tiny")
    config = NodeConfig(swarm=["/ip4/127.0.0.1/tcp/1"], hidden_dim=8)
    assert explicit_fields(config) == {"swarm", "hidden_dim"}
    # the CLI's: what was given, even when equal to the default
    given = given_fields(NodeConfig, environ={"DMOE_NODE_LR": "0.001"},
                         overrides={"hidden_dim": 1024, "experts": (), "model": None})
    assert given == {"hidden_dim", "lr"}
