"""A node's control channel to a relay made by hand (register, then read what the relay sends), for tests
that play a node the relay must refuse, time out or take back."""

from __future__ import annotations

import json
import socket

from dmoe.core.addresses import split_address


class Registration:
    """Register ``node_id`` with the relay at ``relay.address`` from the loopback address ``source``
    (with the secret of an earlier registration, to take its place back); ``reply`` is the relay's answer,
    ``file`` reads what it sends next."""

    def __init__(self, relay, node_id: str, source: str = "127.0.0.1", secret: str | None = None):
        self.conn = socket.create_connection(split_address(relay.address), timeout=10,
                                             source_address=(source, 0))
        message = {"op": "register", "node_id": node_id} | ({"secret": secret} if secret else {})
        self.conn.sendall(json.dumps(message).encode() + b"\n")
        self.file = self.conn.makefile("rb")
        self.reply = json.loads(self.file.readline() or b"{}")

    def close(self) -> None:
        self.file.close()
        self.conn.close()
