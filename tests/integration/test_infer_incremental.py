"""Generation through a real node with the key/value cache: each byte sends one token per MoE layer to
the node's experts, and greedy decoding writes the same text as the full-context path (and as the same
model with its experts in this process)."""

from __future__ import annotations

import pytest
import torch
from swarm_fixtures import module_node, wait_for

from dmoe.client.config import SwarmConfig
from dmoe.client.swarm import Swarm
from dmoe.lm.config import LMConfig
from dmoe.lm.model import MoELM, local_moe_factory, remote_moe_factory

pytestmark = pytest.mark.timeout(120)
CONFIG = LMConfig(d_model=32, num_heads=2, num_layers=2, num_experts=4, expert_inner=64, seq_len=24)
node = module_node("--hidden-dim", "32", "--inner-dim", "64", "--num-threads", "1",
                   "--experts", "lm0.[0:4]", "--experts", "lm1.[0:4]")


@pytest.fixture(scope="module")
def swarm(node):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small: a second thread only spins on a busy machine
    with Swarm(SwarmConfig(initial_peers=node.swarm, cache_ttl=600)) as swarm:
        prefixes = ["lm0.", "lm1."]
        wait_for(lambda: all(len(found) == 4 for found in swarm.live_under(prefixes, refresh=True).values()),
                 30, "the node's 8 experts")
        yield swarm
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def remote_model(swarm):
    """The model with its experts on the node; every expert answers every call (k_min = k)."""
    torch.manual_seed(0)
    return MoELM(CONFIG, remote_moe_factory(swarm, k_min=CONFIG.k, forward_timeout=30,
                                            timeout_after_k_min=30)).eval()


def test_greedy_text_through_the_node_is_the_same_with_and_without_the_cache(remote_model):
    calls = [[] for _ in remote_model.moe_layers()]
    for layer, sizes in zip(remote_model.moe_layers(), calls):
        layer.register_forward_hook(lambda module, args, out, sizes=sizes: sizes.append(args[0].shape[1]))
    prompt = list(b"def main():\n    ")
    with_cache = remote_model.generate(prompt, 40, temperature=0)
    # 16 bytes, then one at a time to 24; the 25th slides the window by 12 to 13 bytes, run at once ...
    expected = [16] + [1] * 8 + [13] + [1] * 11 + [13] + [1] * 11 + [13] + [1] * 6
    assert calls == [expected, expected]
    full = remote_model.generate(prompt, 40, temperature=0, cache=False)
    assert with_cache == full and len(set(full)) > 3
    assert sum(layer.num_failed_calls for layer in remote_model.moe_layers()) == 0

    torch.manual_seed(0)  # the same client-side weights, the same uid-seeded experts, in this process
    local = MoELM(CONFIG, local_moe_factory()).eval()
    local.load_state_dict(remote_model.state_dict(), strict=False)
    assert local.generate(prompt, 40, temperature=0) == with_cache


def test_a_prompt_longer_than_the_window_and_a_slide_of_one_byte(remote_model):
    """The window of the last seq_len bytes at every step: the cache is rebuilt every byte."""
    prompt = list(b"import os\nimport sys\n\nclass Reader:\n")  # 37 bytes: only the last 24 are seen
    assert (remote_model.generate(prompt, 12, temperature=0, slide=1)
            == remote_model.generate(prompt, 12, temperature=0, slide=1, cache=False))


def test_remote_experts_are_per_position_unless_their_schema_names_another_class(swarm, remote_model):
    assert remote_model.per_position()  # no schema: MoELM's feed-forward experts are FFN experts
    for schema, expected in (("ffn/h32/i64/float32", True), ("transformer/h32/i64/float32", False)):
        model = MoELM(CONFIG, remote_moe_factory(swarm, expert_schema=schema))
        assert model.per_position() is expected
