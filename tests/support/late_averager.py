"""Trainers' averaging in a private swarm, for tests: two members average, a third joins late and
catches up, an outsider without the key looks for their averaging. Prints one JSON object.

``python late_averager.py KEYFILE``. Members a and b hold parameters of 1.0 and 3.0 and average one
round (each then holds 2.0); c, holding 7.0, joins the DHT only after that round and catches up
(:meth:`ParameterAverager.catch_up`, what a late ``dmoe train --run-id`` does before its first step).
Printed: ``averaged`` (a's and b's values after the round, and its outcome for each), ``late`` (c's
values ``before`` and ``after`` catching up, and the averagers it ``found`` in the DHT: the peer ids
under the run's key of those that share their state, which is how an averager finds whom to load
from; ``members``: a's and b's peer ids), ``outsider`` (a DHT peer without the key that joins through
a: "refused: <why>" if it cannot, else the averagers it finds the same way). Every averager is made
before any thread starts (they fork).
"""

import json
import sys
import threading
import time

import torch
from hivemind.p2p import PeerID

from dmoe.core.auth import SwarmKey
from dmoe.core.dht import DHTPeer
from dmoe.core.dhtauth import DHTAuthorizer
from dmoe.errors import DmoeError
from dmoe.lm.averaging import ParameterAverager

SHAPES = [(4, 4), (4,)]
RUN_ID = "late"


def parameters(value: float) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.full(shape, value)) for shape in SHAPES]


def values(params: list[torch.nn.Parameter]) -> list[float]:
    """The distinct values the parameters hold."""
    return sorted({float(v) for p in params for v in p.detach().flatten()})


def catch_up(averager: ParameterAverager, timeout: float = 40.0) -> bool:
    """catch_up until it loads something: the members declare that they share their state every few
    seconds, and a trainer that joins before the first declaration finds no one to load from."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if averager.catch_up(timeout=5.0):
            return True
    return False


def averagers_found(peer: DHTPeer) -> list[str]:
    """The peer ids of the run's averagers that share their state, as the DHT gives them to ``peer``."""
    assert peer.node is not None
    entry = peer.run(peer.node.get(f"dmoe_run_{RUN_ID}.all_averagers", latest=True), 30)
    if entry is None or not isinstance(entry.value, dict):
        return []
    return sorted(str(PeerID(subkey)) if isinstance(subkey, bytes) else str(subkey) for subkey in entry.value)


def main() -> None:
    key = SwarmKey.load(sys.argv[1])
    held = {"a": 1.0, "b": 3.0, "c": 7.0}
    params = {name: parameters(value) for name, value in held.items()}
    peers = {name: DHTPeer(authorizer=DHTAuthorizer(key)) for name in held}
    peers["outsider"] = DHTPeer()
    averagers = {name: ParameterAverager(params[name], peer=peers[name], run_id=RUN_ID, interval=3600.0,
                                         matchmaking_time=1.0, round_timeout=20.0) for name in held}
    result: dict = {}
    try:
        peers["a"].start()
        peers["b"].initial_peers = list(peers["a"].visible_maddrs)
        peers["b"].start()
        for name in ("a", "b"):
            averagers[name].connect()
        outcomes: dict[str, bool] = {}

        def run(name: str) -> None:
            outcomes[name] = averagers[name].round() and averagers[name].apply_pending()

        for _ in range(3):  # a round that finds no group (one peer's matchmaking ended early) is tried again
            threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            if all(outcomes.values()):
                break
        result["averaged"] = {name: values(params[name]) for name in ("a", "b")} | {"outcomes": outcomes}

        result["late"] = {"before": values(params["c"])}
        peers["c"].initial_peers = list(peers["a"].visible_maddrs)
        peers["c"].start()
        averagers["c"].connect()
        result["late"] |= {"loaded": catch_up(averagers["c"]), "after": values(params["c"]),
                           "found": averagers_found(peers["c"]),
                           "members": sorted(peers[name].peer_id for name in ("a", "b"))}

        peers["outsider"].initial_peers = list(peers["a"].visible_maddrs)
        try:
            peers["outsider"].start(30)
        except DmoeError as e:
            result["outsider"] = f"refused: {e}"
        else:
            result["outsider"] = averagers_found(peers["outsider"])
    finally:
        for name in reversed(list(averagers)):  # the last forked first: it holds the others' pipes
            averagers[name].shutdown()
        for peer in peers.values():
            peer.shutdown()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
