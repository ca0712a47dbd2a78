"""One averaging round of four trainers' averagers (real ones: hivemind's all-reduce over libp2p), one of
them hostile, for each attack asked; prints one JSON line per attack: where the honest peers landed.

``python byzantine_round.py AGGREGATE ATTACK...``. Honest peers offer a common point plus their own
small update (1% of its norm); peer 0 offers :func:`dmoe.testing.byzantine.poison` of its own. Printed
per attack: each peer's outcome ("averaged", "refused", "failed"), group sizes, and each honest peer's
distance from the honest peers' mean, relative to the point's norm, before and after the round. A
round that does not put all four in one group, or that fails for any of them, is tried again (up to
three times)."""

import json
import math
import sys

import torch

from dmoe.testing.byzantine import AveragingPeers, poison

SHAPES = [torch.Size([64, 64]), torch.Size([64]), torch.Size([256, 64]), torch.Size([256])]
NUM_PEERS = 4


def distance(a: list[torch.Tensor], b: list[torch.Tensor], norm: float) -> float:
    return math.sqrt(sum(float((x - y).square().sum()) for x, y in zip(a, b))) / norm


def main() -> None:
    aggregate, attacks = sys.argv[1], sys.argv[2:]
    generator = torch.Generator().manual_seed(0)
    base = [0.1 * torch.randn(shape, generator=generator) for shape in SHAPES]
    norm = math.sqrt(sum(float(t.square().sum()) for t in base))
    stale = [0.1 * torch.randn(shape, generator=generator) for shape in SHAPES]  # another, older point
    offers = [[t + 0.01 * t.norm() / math.sqrt(t.numel()) * torch.randn(t.shape, generator=generator)
               for t in base] for _ in range(NUM_PEERS)]
    honest_mean = [torch.stack(ts).mean(0) for ts in zip(*offers[1:])]
    with AveragingPeers(SHAPES, num_peers=NUM_PEERS, run_id=f"byzantine-{aggregate}", aggregate=aggregate,
                        matchmaking_time=1.5) as peers:
        for attack in attacks:
            for _ in range(3):
                peers.set(0, poison(attack, offers[0], base, stale, generator))
                for i in range(1, NUM_PEERS):
                    peers.set(i, offers[i])
                outcomes = peers.round()  # a failed round (any peer's) is tried again, as one of other groups
                if "failed" not in outcomes and all(size == NUM_PEERS for size in peers.group_sizes()):
                    break
            print(json.dumps({
                "aggregate": aggregate, "attack": attack, "outcomes": outcomes, "groups": peers.group_sizes(),
                "before": [distance(offers[i], honest_mean, norm) for i in range(1, NUM_PEERS)],
                "after": [distance(peers.tensors[i], honest_mean, norm) for i in range(1, NUM_PEERS)],
            }), flush=True)


if __name__ == "__main__":
    main()
