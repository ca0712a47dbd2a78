"""The trainers' part reducer (hivemind's TensorPartReducer with dmoe's aggregate): parts reduced with the
mean or with centered-clip, every sender weighing the same; the averager's RPC names stay hivemind's."""

import asyncio

import pytest
import torch
from hivemind.averaging import DecentralizedAverager

from dmoe.core.robust import centered_clip
from dmoe.lm.averaging import PartReducer, RobustAverager

pytestmark = pytest.mark.timeout(60)


def reduce_all(aggregate: str, parts_by_sender: list[list[torch.Tensor]], weights: list[float]):
    """Each sender's parts through one reducer, concurrently, as hivemind's all-reduce feeds it."""
    async def main():
        shapes = [part.shape for part in parts_by_sender[0]]
        reducer = PartReducer(shapes, len(parts_by_sender), aggregate=aggregate)

        async def send(index: int) -> list[torch.Tensor]:
            return [await reducer.accumulate_part(index, i, part, weight=weights[index])
                    for i, part in enumerate(parts_by_sender[index])]

        results = await asyncio.gather(*(send(i) for i in range(len(parts_by_sender))))
        assert reducer.finished.is_set()
        return results

    return asyncio.run(main())


def test_parts_are_reduced_by_the_aggregate_with_equal_weights():
    generator = torch.Generator().manual_seed(0)
    senders = [[torch.randn(5, generator=generator), torch.randn(3, generator=generator)] for _ in range(3)]
    senders.append([1000 * part for part in senders[0]])  # a hostile sender
    weights = [1.0, 1.0, 1.0, 1e6]  # it declares a huge weight too: ignored
    for aggregate in ("mean", "centered-clip"):
        results = reduce_all(aggregate, senders, weights)
        assert all(len(r) == 2 for r in results)
        for i in range(2):
            parts = [s[i] for s in senders]
            expected = torch.stack(parts).mean(0) if aggregate == "mean" else centered_clip(parts)
            for r in results:  # every sender gets the same reduced part
                torch.testing.assert_close(r[i], expected)
    honest_mean = torch.stack([s[0] for s in senders[:3]]).mean(0)
    clipped = reduce_all("centered-clip", senders, weights)[0][0]
    spread = max(float((s[0] - honest_mean).norm()) for s in senders[:3])
    assert float((clipped - honest_mean).norm()) < spread  # the mean is 250 times farther
    with pytest.raises(ValueError, match="aggregate"):
        PartReducer([torch.Size([1])], 1, aggregate="median")


def test_non_finite_parts_are_outliers_to_centered_clip_and_wrong_shapes_are_left_out():
    generator = torch.Generator().manual_seed(1)
    senders = [[torch.randn(4, generator=generator)] for _ in range(3)]
    senders.append([torch.tensor([float("nan"), 1.0, float("inf"), 0.0])])
    mean, = reduce_all("mean", senders, [1.0] * 4)[0]
    assert bool(mean.isnan().any())  # the mean: NaN, which the trainer's guard refuses
    clipped, = reduce_all("centered-clip", senders, [1.0] * 4)[0]
    torch.testing.assert_close(clipped, centered_clip([s[0] for s in senders[:3]]))

    # a part of another shape is left out, and the others' parts reduced without waiting for it
    for aggregate in ("mean", "centered-clip"):
        results = reduce_all(aggregate, [[torch.ones(4)], [torch.zeros(5)], [3 * torch.ones(4)]], [1.0] * 3)
        for result, in results:
            torch.testing.assert_close(result, 2 * torch.ones(4))


def test_the_averagers_rpc_names_are_hivemind_s():
    """So that trainers of either aggregate, and older ones, find each other and average together."""
    for method in ("rpc_join_group", "rpc_aggregate_part", "rpc_download_state"):
        assert RobustAverager._get_handle_name("dmoe_run_x", method) == \
            DecentralizedAverager._get_handle_name("dmoe_run_x", method) == \
            f"dmoe_run_x::DecentralizedAverager.{method}"
