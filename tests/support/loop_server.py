"""LoopServer: a base for the stand-in gRPC servers of the tests, serving from an event loop of its
own in a thread, so that a test's blocking client can call them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

import grpc


class LoopServer:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None  # set by the subclass's coroutine

    def _run_on_loop(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Start the loop's thread if it is not running yet, run ``coroutine`` there, return its result."""
        if not self._thread.is_alive():
            self._thread.start()
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def shutdown(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
