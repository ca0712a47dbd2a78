"""all_settled: many futures awaited with one wake-up of the loop, on the loop's own futures (a step's
expert calls) and on futures another thread settles (a node runtime's parts)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from dmoe.core.futures import all_settled

pytestmark = pytest.mark.timeout(30)


def test_settled_gives_what_gather_with_exceptions_gives_and_cancels_what_it_waits_for():
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        answered, failed, cancelled = loop.create_future(), loop.create_future(), loop.create_future()
        waiting = asyncio.ensure_future(all_settled([answered, failed, cancelled]))
        error = ValueError("bad reply")
        loop.call_soon(answered.set_result, "outputs")
        loop.call_soon(failed.set_exception, error)
        loop.call_soon(cancelled.cancel)
        results = await waiting
        assert results[:2] == ["outputs", error] and isinstance(results[2], asyncio.CancelledError)
        gathered = await asyncio.gather(answered, failed, cancelled, return_exceptions=True)
        assert gathered[:2] == results[:2] and isinstance(gathered[2], asyncio.CancelledError)
        assert await all_settled([]) == []

        held = [loop.create_future() for _ in range(3)]
        waiting = asyncio.ensure_future(all_settled(held))
        await asyncio.sleep(0)
        waiting.cancel()  # the backward given up: its calls are withdrawn
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert all(future.cancelled() for future in held)

    asyncio.run(scenario())


def test_futures_settled_by_another_thread_wake_the_loop_once_and_are_cancelled_with_it():
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        parts = [concurrent.futures.Future() for _ in range(50)]
        woken = []
        original = loop.call_soon_threadsafe

        def counting(*args, **kwargs):
            woken.append(threading.current_thread().name)
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        error = RuntimeError("device error")

        def runtime() -> None:  # as a node's runtime thread settles a packed call's parts
            for i, part in enumerate(parts):
                if i == 7:
                    part.set_exception(error)
                else:
                    part.set_result(i)

        waiting = asyncio.ensure_future(all_settled(parts))
        await asyncio.sleep(0)
        worker = threading.Thread(target=runtime, name="runtime")
        worker.start()
        results = await asyncio.wait_for(waiting, 10)
        worker.join()
        assert results == [error if i == 7 else i for i in range(50)]
        assert woken == ["runtime"]  # one wake-up for all fifty, from the thread that settled the last

        held = [concurrent.futures.Future() for _ in range(3)]
        waiting = asyncio.ensure_future(all_settled(held))
        await asyncio.sleep(0)
        waiting.cancel()  # the call's deadline: the runtime drops the parts not yet run
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert all(part.cancelled() for part in held)

    asyncio.run(scenario())
