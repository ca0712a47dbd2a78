"""Generation with the attention's key/value cache: each step runs only the new byte through the model
(one token per MoE layer), and greedy decoding writes the same text as the full-context path, across
slides of the window; models whose sublayers are not per-position fall back to the full context."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from dmoe.cli import main
from dmoe.errors import ConfigError
from dmoe.lm.config import InferConfig, LMConfig, TrainConfig
from dmoe.lm.model import KVCache, MoELM, default_slide, local_moe_factory
from dmoe.lm.train import Trainer
from dmoe.moe.local import LocalMoE

pytestmark = pytest.mark.timeout(60)
CONFIG = LMConfig(d_model=32, num_heads=2, num_layers=2, num_experts=4, expert_inner=64, seq_len=16)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small run fastest on one thread; on a busy machine, a second one spins for nothing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def local_model(seed: int = 0, **moe_options) -> MoELM:
    torch.manual_seed(seed)
    if not moe_options:
        return MoELM(CONFIG, local_moe_factory()).eval()
    return MoELM(CONFIG, lambda c, i: LocalMoE(prefix=c.layer_prefix(i), grid=(c.num_experts,),
                                               in_features=c.d_model, k=c.k, inner_dim=c.expert_inner,
                                               **moe_options)).eval()


def record_tokens(model: MoELM) -> list[list[int]]:
    """Per MoE layer, the number of tokens of each of its calls (a forward hook on the real layer)."""
    sizes: list[list[int]] = [[] for _ in model.moe_layers()]
    for layer, calls in zip(model.moe_layers(), sizes):
        layer.register_forward_hook(lambda module, args, out, calls=calls: calls.append(args[0].shape[1]))
    return sizes


def test_a_forward_in_pieces_through_the_cache_equals_the_whole_forward():
    model = local_model()
    tokens = torch.randint(0, 256, (2, CONFIG.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(tokens)
        cache = KVCache(CONFIG.num_layers)
        pieces = [model(tokens[:, a:b], cache) for a, b in ((0, 5), (5, 6), (6, 11), (11, 12), (12, 16))]
    assert len(cache) == CONFIG.seq_len
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="longer than seq_len"):
        model(tokens[:, :1], cache)  # the cache is full: position seq_len does not exist


@pytest.mark.parametrize("prompt, slide", [
    (b"def f(x):", None), (b"def f(x):", 1), (b"def f(x):", 5), (b"", None),
    (bytes(range(40, 80)), 16), (bytes(range(40, 80)), 1),  # a prompt longer than the window
], ids=["default-slide", "slide-1", "slide-5", "empty-prompt", "long-prompt-slide-16", "long-prompt-slide-1"])
def test_greedy_text_with_the_cache_equals_the_full_context(prompt, slide):
    model = local_model()
    with_cache = model.generate(list(prompt), 50, temperature=0, slide=slide)
    full = model.generate(list(prompt), 50, temperature=0, slide=slide, cache=False)
    assert with_cache == full and len(full) == 50
    assert len(set(full)) > 3  # the text is not one byte repeated: the comparison has something to compare


def test_each_step_sends_each_moe_layer_only_the_new_byte_and_the_window_once_after_it_slides():
    model = local_model()
    sizes = record_tokens(model)
    model.generate(list(b"hello"), 30, temperature=0, slide=8)
    # window 5 bytes; grows by one a step up to 16; the 17th byte slides it by 8 to 9 bytes, run at once
    expected = [5] + [1] * 11 + ([9] + [1] * 7) * 2 + [9, 1]
    assert sizes == [expected, expected]
    for calls in sizes:
        calls.clear()
    model.generate(list(b"hello"), 30, temperature=0, slide=8, cache=False)
    windows = list(range(5, 17)) + list(range(9, 17)) * 2 + [9, 10]
    assert sizes == [windows, windows]
    assert default_slide(CONFIG.seq_len) == 8 and default_slide(1) == 1


def test_sampling_with_a_seed_writes_the_same_bytes_with_and_without_the_cache():
    model = local_model(seed=3)
    texts = [model.generate(list(b"import "), 40, temperature=0.9, top_k=20, cache=cache,
                            generator=torch.Generator().manual_seed(7)) for cache in (True, False)]
    assert texts[0] == texts[1]


def test_the_dense_model_uses_the_cache_too():
    torch.manual_seed(0)
    model = MoELM(LMConfig(**{**CONFIG.to_dict(), "ffn": "dense"})).eval()
    assert model.per_position()
    assert (model.generate(list(b"class "), 40, temperature=0)
            == model.generate(list(b"class "), 40, temperature=0, cache=False))


@pytest.mark.parametrize("moe_options", [dict(expert_cls="transformer"), dict(routing="switch", k=1)])
def test_a_model_whose_experts_see_the_whole_call_falls_back_to_the_full_context(moe_options):
    """A transformer expert attends over the tokens of its call, Switch's capacity is shared by them:
    one token at a time would change their outputs, so generation runs the whole window every byte."""
    if moe_options.get("k") == 1:
        torch.manual_seed(0)
        config = LMConfig(**{**CONFIG.to_dict(), "k": 1})
        model = MoELM(config, lambda c, i: LocalMoE(prefix=c.layer_prefix(i), grid=(c.num_experts,),
                                                    in_features=c.d_model, k=1, inner_dim=c.expert_inner,
                                                    routing="switch")).eval()
    else:
        model = local_model(**moe_options)
    assert not model.per_position() and local_model().per_position()
    sizes = record_tokens(model)
    text = model.generate(list(b"hello"), 14, temperature=0)
    assert sizes[0] == list(range(5, 17)) + [9, 10]  # the whole window every step: no cache
    assert text == model.generate(list(b"hello"), 14, temperature=0, cache=False)


def test_a_slide_out_of_range_is_refused():
    model = local_model()
    for slide in (0, CONFIG.seq_len + 1):
        with pytest.raises(ValueError, match="slide must be in"):
            model.generate([1, 2], 3, slide=slide)
    with pytest.raises(ConfigError, match="slide must be >= 0"):
        InferConfig(checkpoint="run", slide=-1)


def test_dmoe_infer_writes_the_same_text_with_and_without_the_cache(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 200)
    config = TrainConfig(**{**CONFIG.to_dict()}, local=True, data=str(corpus), steps=2, batch_size=2,
                         eval_interval=0, eval_batches=1, save=str(tmp_path / "run"))
    with Trainer(config) as trainer:
        trainer.train()
    common = ["infer", "--checkpoint", str(tmp_path / "run"), "--prompt", "def ", "--max-new-tokens", "40",
              "--temperature", "0"]
    flags = [(), ("--no-cache",), ("--slide", "1"), ("--slide", "1", "--no-cache")]
    runs = {flag: CliRunner().invoke(main, [*common, *flag]) for flag in flags}
    for flag, run in runs.items():
        assert run.exit_code == 0, (flag, run.output)
        assert run.output.startswith("def ")
    assert runs[()].output == runs[("--no-cache",)].output
    assert runs[("--slide", "1")].output == runs[("--slide", "1", "--no-cache")].output
    refused = CliRunner().invoke(main, [*common, "--slide", "17"])
    assert refused.exit_code != 0 and "slide must be in [1, seq_len=16], got 17" in refused.output
