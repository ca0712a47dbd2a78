"""The announcer beats early when DHT peers join (so that they hold its records before its next heartbeat),
and no more often than once every quarter of the heartbeat interval however many join: real DHT peers on
127.0.0.1, the announcer on an event loop of its own as a node runs it."""

from __future__ import annotations

import asyncio

import pytest

from dmoe.core.dht import DHTPeer
from dmoe.core.records import ExpertRecord, NodeRecord
from dmoe.node.announcer import Announcer

pytestmark = pytest.mark.timeout(120)
HEARTBEAT = 6.0


def records() -> tuple[list[ExpertRecord], NodeRecord]:
    expert = ExpertRecord(uid="ffn.0", endpoint="127.0.0.1:1001", node_id="n")
    return [expert], NodeRecord(node_id="n", endpoint="127.0.0.1:1001")


def test_peers_joining_bring_early_beats_at_most_once_per_quarter_heartbeat():
    first = DHTPeer().start()
    joined: list[DHTPeer] = []
    try:
        async def run() -> tuple[list[float], int, float]:
            clock = asyncio.get_running_loop().time
            announcer = Announcer(first, records, heartbeat_interval=HEARTBEAT, record_ttl=60.0,
                                  join_look=0.05)
            beats: list[float] = []
            beat = announcer.beat

            async def timed_beat() -> int:
                beats.append(clock())
                return await beat()

            announcer.beat = timed_beat  # type: ignore[method-assign]
            await announcer.start()
            try:
                begun = clock()
                for _ in range(4):  # peers joining one after another, each seen within join_look
                    joined.append(await asyncio.to_thread(
                        DHTPeer(initial_peers=first.visible_maddrs).start))
                # a beat for the last of them, early or on the heartbeat: at most one interval away
                await asyncio.wait_for(_beaten_since(beats, clock()), HEARTBEAT + 30)
                return beats, announcer.num_early_beats, begun
            finally:
                await announcer.stop()

        beats, early, begun = asyncio.run(run())
        gaps = [b - a for a, b in zip(beats, beats[1:])]
        assert early >= 1, beats  # peers joined within the first interval: not all waited for it
        # the first early beat came before the interval ended; none closer to the last than a quarter
        assert beats[1] < begun + HEARTBEAT, beats
        assert min(gaps) >= HEARTBEAT / 4 - 0.01, gaps
    finally:
        for peer in joined:
            peer.shutdown()
        first.shutdown()


async def _beaten_since(beats: list[float], since: float) -> None:
    while not beats or beats[-1] < since:
        await asyncio.sleep(0.05)


def test_a_routing_table_that_cannot_be_read_leaves_the_heartbeat_as_it_was(caplog):
    peer = DHTPeer().start()
    try:
        async def run() -> int:
            announcer = Announcer(peer, records, heartbeat_interval=0.5, record_ttl=60.0, join_look=0.05)
            looks = 0
            read = announcer._peers

            async def failing() -> frozenset:  # the first look (at start) works, every later one fails
                nonlocal looks
                looks += 1
                if looks > 1:
                    raise RuntimeError("the routing table is gone")
                return await read()

            announcer._peers = failing  # type: ignore[method-assign]
            await announcer.start()
            try:
                # beats go on at the heartbeat interval (each one a real store on the DHT peer)
                await asyncio.wait_for(_beats(announcer, 4), 30)
                return looks
            finally:
                await announcer.stop()

        looks = asyncio.run(run())
        assert looks > 4  # the table was looked at (and failed) between the beats
        assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    finally:
        peer.shutdown()


async def _beats(announcer: Announcer, count: int) -> None:
    while announcer.num_beats < count:
        await asyncio.sleep(0.05)
