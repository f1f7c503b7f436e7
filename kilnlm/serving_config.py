"""``ServeConfig``: everything ``kiln serve`` needs to build the Ray Serve application.

A typed dataclass like every config in kilnlm: validated in ``__post_init__`` with errors that
name the field, loadable from a TOML/JSON/YAML file (``kilnlm.config.load(ServeConfig, path,
section="serve")``) and from ``--field`` CLI flags, and picklable across Ray. The engine's own
knobs (block size, KV budget, batch sizes, queue bound) are the nested ``EngineConfig``.

No Ray here: the library never imports it; ``kilnlm.actors.serve_app`` turns this into a Serve
application.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kilnlm.engine import EngineConfig


@dataclass
class ServeConfig:
    """How the gateway listens and how many LLM server replicas run, with what resources."""

    checkpoint: str | None = None
    """Checkpoint directory served from the start. None starts the replicas empty: health
    NOT_SERVING and UNAVAILABLE for requests until the orchestrator promotes a version."""
    version: int | None = None
    """Version of ``checkpoint``; None reads manifest.json's ``version`` field (1 if it has none)."""
    host: str = "127.0.0.1"
    """Address the gRPC gateway binds; loopback by default so nothing is exposed by accident."""
    port: int = 50051
    """Gateway port; 0 picks a free one (tests), reported by the gateway's ``address()``."""
    app_name: str = "kiln"
    """Name of the Serve application (several can run side by side on one cluster)."""
    num_replicas: int = 1
    """LLM server replicas (ignored when ``autoscaling``)."""
    autoscaling: bool = False
    """Let Serve scale replicas between min_replicas and max_replicas on ongoing requests."""
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 32.0
    """Autoscaling target: in-flight requests per replica before Serve adds one."""
    max_ongoing_requests: int = 256
    """Requests Serve lets into one replica at once (the engine batches and queues them)."""
    max_queued_requests: int = 1024
    """Requests Serve holds waiting for a replica before answering RESOURCE_EXHAUSTED; -1 = no bound."""
    replica_num_cpus: float = 0.5
    """Logical CPUs per replica: fractional so replicas, gateway and trainers fit on a laptop."""
    replica_num_gpus: float = 0.0
    replica_resource: str | None = None
    """A custom Ray resource each replica asks one unit of, e.g. "kiln_replica": replicas then
    land only on the nodes that advertise it, apart from the nodes that train (ClusterConfig.
    worker_resource). None: any node with the CPUs (and GPUs)."""
    gateway_num_cpus: float = 0.25
    gateway_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources for the gateway, e.g. {"kiln_gateway": 1} to pin it to the head node."""
    torch_threads: int = 1
    """torch intra-op threads per replica process (2-core laptop: 1, or processes oversubscribe)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Block size, KV budget, batch sizes, queue bound, swap mode, device and dtype (None: CUDA
    in bfloat16 when the replica has a GPU, else CPU in float32)."""
    http_port: int = 8000
    """Port of the OpenAI-compatible HTTP API (Ray Serve's HTTP proxy, on ``host``); 0 turns it
    off. One per Ray cluster: Serve has one HTTP proxy, so a second application keeps 0."""
    served_model_name: str | None = None
    """The model id of the HTTP API (``/v1/models``, the ``model`` clients pass); None: the
    application's name (stable across hot-swaps, unlike a checkpoint's path)."""
    api_key: str | None = None
    """Bearer key every HTTP ``/v1`` call must carry; None: open (loopback by default). ``kiln
    serve`` reads it from $KILN_API_KEY so it stays out of shell history."""
    admin_token: str | None = None
    """Bearer token admin calls must carry (``authorization: Bearer <token>``); None refuses every
    admin call. ``kiln serve`` reads it from $KILN_ADMIN_TOKEN so it stays out of shell history."""
    tls_cert: str | None = None
    """PEM certificate chain of the gateway; with ``tls_key`` the gateway speaks TLS only."""
    tls_key: str | None = None
    retry_after_ms: int = 250
    """Hint sent with RESOURCE_EXHAUSTED (trailing metadata ``retry-after-ms``)."""
    health_poll_s: float = 0.5
    """How often the gateway asks a replica whether a model is loaded (grpc.health.v1 status)."""
    max_score_bytes: int = 1 << 20
    """The longest text Score accepts, in UTF-8 bytes."""
    stream_interval_s: float = 0.25
    """A stream's first delta leaves the replica at once; after it, deltas are held at most this
    long and sent as one message (``kilnlm.actors.streaming``). Every message costs ~1 ms of CPU
    in Ray's streaming and in the gateway, so one per token caps the path near 1k tokens/s; 0
    sends one message per engine step (merged only when the gateway lags). 250 ms, because on
    a CPU a batch step of 32 streams takes ~50 ms, so Ray Serve LLM's 50 ms merges nothing
    (docs/benchmarks.md: 0.50 -> 0.74 of the in-process engine's tokens/s, TTFT unchanged);
    a client sees its tokens in bursts of at most 250 ms or ``stream_max_tokens``."""
    stream_max_tokens: int = 16
    """Send held deltas as soon as this many tokens are pending (0: only the interval counts)."""
    failover_max_resends: int = 5
    """When a replica dies under a stream, the gateway resends the request to another replica
    with the tokens already streamed, pinned to the same version, at most this many times;
    0 turns failover off (the client gets UNAVAILABLE and retries itself)."""
    failover_backoff_s: float = 0.2
    """Wait before the first resend, doubled for each next one (Serve is replacing the replica)."""

    def __post_init__(self) -> None:
        if isinstance(self.engine, dict):
            from kilnlm.config import from_dict

            self.engine = from_dict(EngineConfig, self.engine, "ServeConfig.engine")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535] (0 picks a free port), got {self.port}")
        if not 0 <= self.http_port <= 65535:
            raise ValueError(
                f"http_port must be in [0, 65535] (0: no HTTP API), got {self.http_port}"
            )
        if self.served_model_name == "":
            raise ValueError("served_model_name must not be empty (None: the app_name)")
        self._check_positive()
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                "tls_cert and tls_key must be given together (or neither, for plaintext)"
            )
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{name} {path!r} is not a file; pass a PEM file")
        if self.max_queued_requests < -1 or self.max_queued_requests == 0:
            raise ValueError(
                f"max_queued_requests must be >= 1 or -1, got {self.max_queued_requests}"
            )
        if self.version is not None and self.version < 1:
            raise ValueError(f"version must be >= 1, got {self.version}")

    def _check_positive(self) -> None:
        for name in ("num_replicas", "min_replicas", "max_replicas", "max_ongoing_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("replica_num_cpus", "gateway_num_cpus", "target_ongoing_requests"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("torch_threads", "retry_after_ms", "max_score_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.replica_resource is not None and (
            not self.replica_resource.strip() or self.replica_resource in ("CPU", "GPU", "memory")
        ):
            raise ValueError(
                "replica_resource must be None or the name of a custom Ray resource (not CPU, "
                f"GPU or memory: replica_num_cpus/gpus ask for those), got {self.replica_resource!r}"
            )
        if self.replica_num_gpus < 0:
            raise ValueError(f"replica_num_gpus must be >= 0, got {self.replica_num_gpus}")
        if not self.stream_interval_s >= 0:
            raise ValueError(f"stream_interval_s must be >= 0, got {self.stream_interval_s}")
        if self.failover_max_resends < 0:
            raise ValueError(f"failover_max_resends must be >= 0, got {self.failover_max_resends}")
        if not self.failover_backoff_s >= 0:
            raise ValueError(f"failover_backoff_s must be >= 0, got {self.failover_backoff_s}")
        if self.stream_max_tokens < 0:
            raise ValueError(f"stream_max_tokens must be >= 0, got {self.stream_max_tokens}")
        if not self.health_poll_s > 0:
            raise ValueError(f"health_poll_s must be > 0, got {self.health_poll_s}")

    @property
    def model_id(self) -> str:
        """The id the HTTP API serves the model under."""
        return self.served_model_name or self.app_name

    @property
    def address(self) -> str:
        """host:port as a client dials it (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


__all__ = ["ServeConfig"]
