"""ChannelCache: a Dispatcher's gRPC channels, one per (endpoint, TLS), the most recently used kept.

Records name endpoints, and over time they name ever more of them: nodes come and go, and a hostile
peer can rotate its records' endpoints on purpose. So the cache keeps at most ``MAX_CHANNELS``
channels; past that, the least recently used one is dropped. A dropped channel is closed once the
calls running on it have ended, never under them (each call made through the cache's methods is
counted in and, by its done callback, out). A client calls far fewer nodes in a step than the cap,
so an honest swarm never sees a channel dropped and made again.

A channel with no call for ``CHANNEL_IDLE_S`` goes idle (gRPC's client idle timeout): it lets its
connection go and stops dialling until its next call. Without it, a channel whose node died went on
redialling that endpoint, with back-off, for as long as the cache kept it.

It is the mapping :class:`dmoe.client.dispatch.Dispatcher` keeps its channels in:
``cache[(endpoint, tls)] = (channel, methods)`` stores a channel and its call objects by method
name (and may drop the least recently used entry), ``cache[(endpoint, tls)]`` returns them (the
methods wrapped to count their calls) and marks the entry used. Everything runs on the loop of the
channels.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

import grpc

logger = logging.getLogger(__name__)

MAX_CHANNELS = 1024  # channels kept per Dispatcher; a client calls far fewer nodes than this in one step
# seconds without a call after which a channel lets its connection go (a node in use is called every step)
CHANNEL_IDLE_S = 60.0


class _Counted:
    """One of a channel's call objects (a multicallable): each call it makes is counted in flight on
    the channel until it ends."""

    __slots__ = ("_cache", "_channel", "_method")

    def __init__(self, cache: ChannelCache, channel: grpc.aio.Channel, method: Any):
        self._cache, self._channel, self._method = cache, channel, method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = self._method(*args, **kwargs)
        self._cache._begin(self._channel)
        call.add_done_callback(lambda _: self._cache._end(self._channel))
        return call


class ChannelCache(collections.OrderedDict):
    """(endpoint, tls) -> (channel, methods), least recently used first; see the module docstring.
    ``max_channels`` None: the module's MAX_CHANNELS."""

    def __init__(self, max_channels: int | None = None):
        super().__init__()
        self.max_channels = max_channels
        self._in_flight: dict[int, int] = {}  # id(channel) -> calls running on it
        self._dropped: dict[int, grpc.aio.Channel] = {}  # dropped from the cache, calls still running
        self._closing: set[asyncio.Task] = set()

    @property
    def num_closing(self) -> int:
        """Channels dropped from the cache and not closed yet (calls still run on them, or closing)."""
        return len(self._dropped) + len(self._closing)

    def __getitem__(self, key: tuple[str, bool]) -> tuple[grpc.aio.Channel, dict[str, Any]]:
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def __setitem__(self, key: tuple[str, bool], value: tuple[grpc.aio.Channel, dict[str, Any]]) -> None:
        channel, methods = value
        if key in self:
            self._drop(super().__getitem__(key)[0])
        super().__setitem__(key, (channel, {name: _Counted(self, channel, m) for name, m in methods.items()}))
        self.move_to_end(key)
        limit = MAX_CHANNELS if self.max_channels is None else self.max_channels
        while len(self) > max(1, limit):
            _, (oldest, _) = self.popitem(last=False)
            self._drop(oldest)

    def clear(self) -> None:
        """Forget every channel; those dropped earlier whose calls still run are closed now (the
        channels still in the cache are the caller's to close, as the Dispatcher does)."""
        super().clear()
        for channel in list(self._dropped.values()):
            self._close(channel)
        self._dropped.clear()

    def _begin(self, channel: grpc.aio.Channel) -> None:
        self._in_flight[id(channel)] = self._in_flight.get(id(channel), 0) + 1

    def _end(self, channel: grpc.aio.Channel) -> None:
        left = self._in_flight.get(id(channel), 1) - 1
        if left > 0:
            self._in_flight[id(channel)] = left
            return
        self._in_flight.pop(id(channel), None)
        if self._dropped.pop(id(channel), None) is not None:
            self._close(channel)

    def _drop(self, channel: grpc.aio.Channel) -> None:
        if self._in_flight.get(id(channel)):
            self._dropped[id(channel)] = channel  # closed by _end, once its last call has ended
        else:
            self._close(channel)

    def _close(self, channel: grpc.aio.Channel) -> None:
        try:
            task = asyncio.get_running_loop().create_task(channel.close())
        except RuntimeError:  # no loop running here (the cache is used on its channels' loop)
            logger.debug("no running loop to close a dropped channel on; it closes when collected")
            return
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
