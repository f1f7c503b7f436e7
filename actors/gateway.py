"""The gRPC gateway: kiln.v1 services on a ``grpc.aio`` server of our own, inside a Serve deployment.

Why not Ray Serve's built-in gRPC proxy (docs/serving.md has the full account): the proxy binds
``[::]:<port>`` in plaintext only (no TLS), its port is global to the Serve instance, it cannot
answer ``grpc.health.v1`` from the gateway's own knowledge (NOT_SERVING while no model is
loaded), and it hides the client's deadline from the code that must stop generation. A
``grpc.aio`` server running on the Gateway replica's event loop gives us all of that and talks
to the LLM server replicas through a streaming ``DeploymentHandle``, one hop instead of two.

The gateway converts, delegates and maps errors — nothing else (STYLE.md 6). The conversions
live in grpc_convert.py, the Serve handle and failover in handle_backend.py; this module holds
the servicers, the server and the Serve deployment:

- ``to_request`` turns a protobuf request into the dataclasses of ``kilnlm.actors.protocol``
  (validating sampling parameters through ``SamplingParams``, whose errors name the field);
- ``to_proto`` turns a dataclass back into its protobuf response;
- ``status_of`` maps an exception (ours, the engine's, Ray's) to a gRPC status code.

Whatever sits behind it is a ``Backend``: the Serve handle in production (``HandleBackend``), a
``ServingModel`` in-process in tests, with the same code path for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from ray import serve

from kilnlm.actors.grpc_convert import (
    PUSHBACK_KEY,
    RETRY_AFTER_KEY,
    UnparsableRequest,
    invalid_utf8_field,
    lenient_deserializer,
    root_cause,
    sampling_from_proto,
    status_of,
    to_proto,
    to_request,
)
from kilnlm.actors.handle_backend import HandleBackend
from kilnlm.actors.protocol import (
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    RewardRequest,
    RewardResult,
    ScoreRequest,
    ScoreResult,
    merge_chunks,
)
from kilnlm.actors.streaming import Failover
from kilnlm.proto import admin_pb2, generation_pb2
from kilnlm.serving_config import ServeConfig

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"]


class Backend(Protocol):
    """What the gateway delegates to: the LLM server replicas (or one ServingModel in tests)."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...

    async def score(self, request: ScoreRequest) -> ScoreResult: ...

    async def reward(self, request: RewardRequest) -> RewardResult: ...

    async def info(self) -> ModelInfo: ...


# --------------------------------------------------------------------------------------------
# Servicers


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.time() + remaining


class GenerationServicer:
    """kiln.v1.Generation: each method converts, delegates to the backend, maps errors."""

    def __init__(self, backend: Backend, retry_after_ms: int = 250) -> None:
        self.backend = backend
        self.retry_after_ms = retry_after_ms

    async def _abort(
        self, context: grpc.aio.ServicerContext, exc: Exception, request: Any = None
    ) -> None:
        request_id = getattr(request, "request_id", None) or None
        status = status_of(exc, self.retry_after_ms, request_id)
        await context.abort(status.code, status.details, status.trailers)

    async def _defaults(self) -> dict[str, Any]:
        """The served model's sampling defaults, where the backend knows them."""
        getter = getattr(self.backend, "generation_defaults", None)
        return await getter() if getter is not None else {}

    async def _stream(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        # aclosing: when the client cancels or its deadline passes, gRPC cancels this task and
        # closing the backend's stream aborts the sequence in the engine (blocks freed).
        try:
            req = to_request(request, _deadline(context), await self._defaults())
            async with contextlib.aclosing(self.backend.generate(req)) as chunks:
                async for chunk in chunks:
                    yield to_proto(chunk)
        except Exception as e:
            await self._abort(context, e, request)

    async def GenerateStream(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        # An async generator function itself: grpc.aio tells streaming handlers by that.
        async for response in self._stream(request, context):
            yield response

    async def Chat(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in self._stream(request, context):
            yield response

    async def Infill(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in self._stream(request, context):
            yield response

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            req = to_request(request, _deadline(context), await self._defaults())
            async with contextlib.aclosing(self.backend.generate(req)) as chunks:
                merged = merge_chunks([chunk async for chunk in chunks])
            return to_proto(merged, generation_pb2.GenerateResponse)
        except Exception as e:
            await self._abort(context, e, request)

    async def Score(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return to_proto(await self.backend.score(to_request(request)))
        except Exception as e:
            await self._abort(context, e)

    async def Reward(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return to_proto(await self.backend.reward(to_request(request)))
        except Exception as e:
            await self._abort(context, e)

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return to_proto(await self.backend.info())
        except Exception as e:
            await self._abort(context, e)


class AdminServicer:
    """kiln.v1.Admin: every call must carry ``authorization: Bearer <token>``.

    The calls themselves belong to the orchestrator (``orchestrator``: an object with the
    same async methods, protobuf in and out); until one is wired in they answer UNIMPLEMENTED
    — after authentication, so an unauthenticated caller learns nothing.
    """

    def __init__(self, token: str | None, orchestrator: Any = None) -> None:
        self.token = token
        self.orchestrator = orchestrator

    def authenticated(self, context: grpc.aio.ServicerContext) -> bool:
        if not self.token:
            return False
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode())

    async def _call(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not self.authenticated(context):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "admin calls need the metadata 'authorization: Bearer <token>' with the "
                "server's admin token (kiln serve reads it from $KILN_ADMIN_TOKEN)",
            )
        if isinstance(request, UnparsableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error()))
        handler = getattr(self.orchestrator, method, None)
        if handler is None:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, f"Admin.{method} needs the orchestrator"
            )
        return await handler(request, context)

    async def Register(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("Register", request, context)

    async def ListCheckpoints(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("ListCheckpoints", request, context)

    async def Promote(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("Promote", request, context)

    async def Rollback(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("Rollback", request, context)

    async def Status(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("Status", request, context)


# --------------------------------------------------------------------------------------------
# The server


def _handlers(service: Any, servicer: Any, pb_module: Any) -> grpc.GenericRpcHandler:
    """Method handlers for every RPC of ``service`` with lenient request parsing."""
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb_module, method.input_type.name)
        response_cls = getattr(pb_module, method.output_type.name)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=lenient_deserializer(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class GatewayServer:
    """A grpc.aio server: kiln.v1.Generation, kiln.v1.Admin, health and reflection.

    grpc.aio binds a server to the event loop it is created on: build it inside the loop that
    will run it (``await start_gateway(...)``).
    """

    def __init__(self, backend: Backend, config: ServeConfig, orchestrator: Any = None) -> None:
        self.backend = backend
        self.config = config
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers(
            (
                _handlers(
                    GENERATION_SERVICE,
                    GenerationServicer(backend, config.retry_after_ms),
                    generation_pb2,
                ),
                _handlers(
                    ADMIN_SERVICE, AdminServicer(config.admin_token, orchestrator), admin_pb2
                ),
            )
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (GENERATION_SERVICE.full_name, ADMIN_SERVICE.full_name, health.SERVICE_NAME)
        reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), self.server)
        self.port = self._bind(config)
        self._health_task: asyncio.Task[None] | None = None

    def _bind(self, config: ServeConfig) -> int:
        address = config.address
        if config.tls_cert is not None and config.tls_key is not None:
            with open(config.tls_key, "rb") as key, open(config.tls_cert, "rb") as cert:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            port = self.server.add_secure_port(address, credentials)
        else:
            port = self.server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"could not bind the gateway to {address}; is another server using it?")
        return port

    @property
    def address(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{host}:{self.port}"

    async def start(self) -> GatewayServer:
        for name in ("", GENERATION_SERVICE.full_name):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        self._health_task = asyncio.create_task(self._report_health())
        return self

    async def _report_health(self) -> None:
        """SERVING exactly while a replica reports a loaded model; polled, so Watch sees changes."""
        while True:
            try:
                info = await asyncio.wait_for(
                    self.backend.info(), timeout=10 * self.config.health_poll_s + 5
                )
                serving = info.loaded
            except Exception:  # a replica restarting or gone: not serving, try again
                serving = False
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in ("", GENERATION_SERVICE.full_name):
                await self.health.set(name, status)
            await asyncio.sleep(self.config.health_poll_s)

    @property
    def running(self) -> bool:
        return self._health_task is not None and not self._health_task.done()

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_gateway(
    backend: Backend, config: ServeConfig, orchestrator: Any = None
) -> GatewayServer:
    """Build and start a gateway on the running event loop; ``.address`` says where it listens."""
    return await GatewayServer(backend, config, orchestrator).start()


# --------------------------------------------------------------------------------------------
# Ray Serve


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.25})
class Gateway:
    """Serve deployment that runs the gRPC server; it takes no Serve (HTTP) traffic itself."""

    async def __init__(self, llm: serve.handle.DeploymentHandle, config: ServeConfig) -> None:
        # [orchestrator] Admin calls go to the application's orchestrator actor (found by name
        # per call, so one started or restarted later is picked up).
        from kilnlm.actors.admin import OrchestratorAdmin

        admin = OrchestratorAdmin(config.app_name)
        failover = Failover(config.failover_max_resends, config.failover_backoff_s)
        self._server = await start_gateway(HandleBackend(llm, failover), config, admin)

    async def address(self) -> str:
        """host:port the gRPC server listens on (the real port when the config asked for 0)."""
        return self._server.address

    async def check_health(self) -> None:
        if not self._server.running:
            raise RuntimeError("the gateway's gRPC server stopped; Serve will restart the replica")

    async def __del__(self) -> None:
        await self._server.stop()


__all__ = [
    "PUSHBACK_KEY",
    "RETRY_AFTER_KEY",
    "Backend",
    "Gateway",
    "GatewayServer",
    "HandleBackend",
    "invalid_utf8_field",
    "root_cause",
    "sampling_from_proto",
    "start_gateway",
    "status_of",
    "to_proto",
    "to_request",
]
