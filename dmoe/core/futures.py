"""Waiting for many futures at once, woken once: a step's expert calls on the client, a packed call's
parts on the node."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Sequence
from typing import Any


async def all_settled(futures: Sequence[asyncio.Future | concurrent.futures.Future]) -> list[Any]:
    """Each future's result or exception (a CancelledError for one cancelled), once all are done, as
    ``asyncio.gather(..., return_exceptions=True)`` gives them, but with one counter for all and the
    awaiting loop woken once, not once per future (each wake-up of a node's loop takes the GIL from its
    runtime thread). The futures may be this loop's or another thread's (a runtime's
    ``concurrent.futures.Future``: their callbacks run in that thread). Cancelled (a call's deadline, its
    caller gone), it cancels them, so that a runtime drops the tasks that have not run yet."""
    if futures:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        left = [len(futures)]
        lock = threading.Lock()

        def settle() -> None:
            if not waiter.done():
                waiter.set_result(None)

        def one_done(_: Any) -> None:  # in the loop, in the future's thread, or here if done already
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if not last:
                return
            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        for future in futures:
            future.add_done_callback(one_done)
        try:
            await waiter
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
    return [asyncio.CancelledError() if future.cancelled() else future.exception() or future.result()
            for future in futures]
