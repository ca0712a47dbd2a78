"""A Dispatcher's channel to an endpoint it no longer calls goes idle after CHANNEL_IDLE_S and stops
dialling it: a channel whose call failed (a node that died) kept redialling, with back-off, for as long
as the cache kept it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import torch

import dmoe.client.channels
from dmoe.client.dispatch import Dispatcher, ExpertJob
from dmoe.core.records import ExpertRecord

pytestmark = pytest.mark.timeout(60)
IDLE_S = 1.5


def test_a_channel_whose_node_died_stops_dialling_it_once_idle(monkeypatch):
    monkeypatch.setattr(dmoe.client.channels, "CHANNEL_IDLE_S", IDLE_S, raising=False)
    with socket.socket() as probe:  # a port nobody listens on: the node is gone
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    dispatcher = Dispatcher(loop)
    try:
        record = ExpertRecord(uid="ffn.0", endpoint=f"127.0.0.1:{port}", node_id="gone")
        answers = dispatcher.forward([ExpertJob("ffn.0", [record], torch.randn(2, 4), torch.arange(2))],
                                     num_tokens=2, k_min=1, forward_timeout=1.0, timeout_after_k_min=0.0,
                                     on_result=lambda call, error: None)
        assert answers.num_failed == 1
        failed_at = time.monotonic()
        # the port comes back (another program, or the node again): count the channel's dials to it
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(16)
            listener.settimeout(0.2)
            dials = []
            while time.monotonic() - failed_at < IDLE_S + 8:
                try:
                    connection, _ = listener.accept()
                except TimeoutError:
                    continue
                dials.append(time.monotonic() - failed_at)
                connection.close()
        late = [round(t, 1) for t in dials if t > IDLE_S + 1.0]
        assert late == [], f"the channel dialled the dead endpoint at {late} s, past its idle time"
    finally:
        dispatcher.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
