"""NodeServer: a node's gRPC server: ExpertService, health checks and reflection on one port.

In a private swarm the port speaks TLS with certificates made from the swarm key
(:mod:`dmoe.core.tls`); otherwise it is plain. Health checks answer SERVING once the server has
started, and NOT_SERVING from the start of a shutdown, while calls in flight still finish.

Every service on the port shares the server's ``max_concurrent_calls``. ExpertService's handlers
pass the node's :class:`~dmoe.node.guard.CallGuard` themselves; the health and reflection services
(grpc's own servicers) pass it in :class:`OpenServiceLimits`, a server interceptor: the same
limits per peer, without the swarm key, and a cap on their streams held open at once
(``max_watch_streams``, health Watch and reflection), so that a peer holding such streams cannot
take the call slots that Forward and Backward need.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from dmoe.core.addresses import host_port
from dmoe.core.auth import SwarmKey
from dmoe.node.guard import CallGuard, Refused
from dmoe.node.service import SERVICE_NAME


class OpenServiceLimits(grpc.aio.ServerInterceptor):
    """CallGuard's limits per peer for every call of the services besides ExpertService (which
    checks them itself, with the swarm key), and at most ``max_streams`` of their streaming calls
    open at once: RESOURCE_EXHAUSTED past either, with a message that names the limit."""

    def __init__(self, guard: CallGuard, max_streams: int):
        self.guard, self.max_streams = guard, max_streams
        self.num_streams = 0  # streaming calls of the open services in progress (event loop only)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # per method name, made once

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            wrapped = self._wrapped[details.method] = self._wrap(handler)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        streaming = handler.request_streaming or handler.response_streaming
        kind = (f"{'stream' if handler.request_streaming else 'unary'}_"
                f"{'stream' if handler.response_streaming else 'unary'}")
        behaviour = getattr(handler, kind)

        async def admit(context: grpc.aio.ServicerContext) -> str:
            try:
                key = self.guard.admit_open(context.peer(), context.auth_context())
            except Refused as e:
                await context.abort(e.code, e.message)
                raise AssertionError("abort returns only by raising") from None
            if streaming:
                if self.num_streams >= self.max_streams:
                    self.guard.release(key)
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"{self.num_streams} health Watch and reflection streams are open "
                                        f"already, this node's limit (max_watch_streams={self.max_streams}); "
                                        f"use Check, or retry later")
                    raise AssertionError("abort returns only by raising")
                self.num_streams += 1
            return key

        def done(key: str) -> None:
            self.guard.release(key)
            if streaming:
                self.num_streams -= 1

        if inspect.isasyncgenfunction(behaviour):
            async def limited(request, context: grpc.aio.ServicerContext):
                key = await admit(context)
                try:
                    async for response in behaviour(request, context):
                        yield response
                finally:
                    done(key)
        else:  # a coroutine (streams written with context.write), or a plain function
            async def limited(request, context: grpc.aio.ServicerContext):
                key = await admit(context)
                try:
                    result = behaviour(request, context)
                    return await result if inspect.isawaitable(result) else result
                finally:
                    done(key)

        return getattr(grpc, f"{kind}_rpc_method_handler")(
            limited, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


class NodeServer:
    """start() binds and serves, enter_graceful_shutdown() fails health checks, stop() ends it."""

    def __init__(self, handler: grpc.GenericRpcHandler, *, max_message_bytes: int, max_concurrent_calls: int,
                 guard: CallGuard, max_watch_streams: int):
        """``max_watch_streams`` is capped at half of ``max_concurrent_calls``, so that such streams
        always leave call slots to the experts' calls."""
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),  # a port another process holds is an error, not a shared one
        ]
        self.limits = OpenServiceLimits(guard, min(max_watch_streams, max(1, max_concurrent_calls // 2)))
        self.server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_concurrent_calls,
                                      interceptors=[self.limits])
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
