"""NodeServer: a node's gRPC server: ExpertService, health checks and reflection on one port.

In a private swarm the port speaks TLS with certificates made from the swarm key
(:mod:`dmoe.core.tls`); otherwise it is plain. Health checks answer SERVING once the server has
started, and NOT_SERVING from the start of a shutdown, while calls in flight still finish.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from dmoe.core.addresses import host_port
from dmoe.core.auth import SwarmKey
from dmoe.node.service import SERVICE_NAME


class NodeServer:
    """start() binds and serves, enter_graceful_shutdown() fails health checks, stop() ends it."""

    def __init__(self, handler: grpc.GenericRpcHandler, *, max_message_bytes: int, max_concurrent_calls: int):
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),  # a port another process holds is an error, not a shared one
        ]
        self.server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_concurrent_calls)
        self.server.add_generic_rpc_handlers((handler,))
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self.server,
        )

    async def start(self, host: str, port: int, tls_key: SwarmKey | None) -> int:
        """Listen on host:port (0: any free port), over TLS made from ``tls_key`` if given, and
        serve; return the port taken. OSError if it cannot listen there."""
        address = host_port(host, port)
        if tls_key is not None:
            from dmoe.core.tls import server_credentials

            bound = self.server.add_secure_port(address, server_credentials(tls_key))
        else:
            bound = self.server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        await self.server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return bound

    async def enter_graceful_shutdown(self) -> None:
        """Health checks answer NOT_SERVING from now on; calls are still served."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        """Take no more calls; those in flight get ``grace`` seconds to finish."""
        await self.server.stop(grace)
