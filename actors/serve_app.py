"""Build and run the Serve application of a ``ServeConfig``: LLMServer replicas behind the Gateway.

    app = build_app(config)                  # Gateway(LLMServer) bound, not yet running
    address = run(config)                    # deploy on the connected Ray cluster; "host:port"

gRPC clients reach the application through the Gateway's own gRPC server (see gateway.py for
why not Serve's gRPC proxy). With ``http_port`` (default 8000) the OpenAI-compatible API
(``openai_api.py``) is the application's root on Serve's HTTP proxy; Serve has one proxy per
cluster, so a second application on the same cluster runs with ``http_port=0`` (proxy
disabled), and two such applications (two ``app_name``s, two gRPC ports) share one cluster.
"""

from __future__ import annotations

import os
import re
from typing import Any

from ray import serve
from ray.serve.config import ProxyLocation

from kilnlm.actors.gateway import Gateway
from kilnlm.actors.server import LLMServer
from kilnlm.serving_config import ServeConfig


def deployment_options(config: ServeConfig) -> dict[str, Any]:
    """LLMServer's Serve options: replicas or autoscaling, queue bounds, per-replica resources."""
    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        "ray_actor_options": {
            "num_cpus": config.replica_num_cpus,
            "num_gpus": config.replica_num_gpus,
        },
    }
    if config.replica_resource:  # one unit: a node advertising N of it hosts at most N replicas
        options["ray_actor_options"]["resources"] = {config.replica_resource: 1}
    if config.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = config.num_replicas
    return options


def build_app(config: ServeConfig) -> serve.Application:
    """The application graph: one Gateway holding a handle to the LLMServer deployment, and
    with ``http_port`` the OpenAI HTTP ingress at its root, holding both (one app, one delete)."""
    llm = LLMServer.options(**deployment_options(config)).bind(config)
    front = {
        "ray_actor_options": {
            "num_cpus": config.gateway_num_cpus,
            "resources": dict(config.gateway_resources),
        }
    }
    gateway = Gateway.options(**front).bind(llm, config)
    if not config.http_port:
        return gateway
    from kilnlm.actors.openai_api import OpenAIServer

    # Not pinned with gateway_resources: Serve's HTTP proxy (HeadOnly) is what listens on the
    # head; the ingress replica may run anywhere, and the head's one kiln_gateway unit is the
    # gRPC gateway's.
    ingress = {"ray_actor_options": {"num_cpus": config.gateway_num_cpus}}
    return OpenAIServer.options(**ingress).bind(llm, gateway, config)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for a Serve config file (``import_path: kilnlm.actors.serve_app:app_builder``).

    ``args`` are ServeConfig fields; the admin token comes from $KILN_ADMIN_TOKEN rather than the
    file, so it never sits in a config checked into version control.
    """
    from kilnlm.config import from_dict

    data = dict(args)
    if os.environ.get("KILN_ADMIN_TOKEN"):
        data.setdefault("admin_token", os.environ["KILN_ADMIN_TOKEN"])
    return build_app(from_dict(ServeConfig, data))


def run(config: ServeConfig) -> str:
    """Deploy the application on the connected Ray cluster; returns the gateway's host:port.

    Returns once every replica has loaded its model (Serve waits for the constructors).
    """
    start_serve(config)
    # No per-call access log: the gateway's health poll alone would write two lines a second.
    logging = {"enable_access_log": False}
    try:
        handle = serve.run(
            build_app(config),
            name=config.app_name,
            route_prefix="/" if config.http_port else None,
            logging_config=logging,
        )
    except RuntimeError as e:  # Serve says only "failed to update the deployments"
        raise DeployError(deploy_failure(config.app_name, e)) from None
    return handle.address.remote().result()


class DeployError(RuntimeError):
    """The application did not start; the message is one line: why its replica failed."""


_EXCEPTION_LINE = re.compile(r"^([\w.]+(?:Error|Exception)): (.+)$")


def deploy_failure(app_name: str, exc: BaseException) -> str:
    """The last exception a replica raised while starting (from Serve's status), as one line."""
    try:
        app = serve.status().applications.get(app_name)
        messages = [d.message for d in app.deployments.values() if d.message] if app else []
    except Exception:  # the status is a courtesy; the error itself is what matters
        messages = []
    causes = [
        m.group(1).rsplit(".", 1)[-1] + ": " + m.group(2)
        for text in messages
        for m in map(_EXCEPTION_LINE.match, (ln.strip() for ln in text.splitlines()))
        if m and not m.group(2).startswith("Traceback")
    ]
    reason = causes[-1] if causes else str(exc).splitlines()[0]
    return f"the Serve application {app_name!r} did not start: {reason}"


def start_serve(config: ServeConfig) -> None:
    """Start Serve (its HTTP proxy on ``host:http_port`` when asked), or check that the running
    one listens where this config wants: Serve has one HTTP proxy per cluster and would silently
    keep the old one (a warning in a log), leaving the API unreachable."""
    if not config.http_port:
        serve.start(proxy_location=ProxyLocation.Disabled)
        return
    serve.start(
        proxy_location=ProxyLocation.HeadOnly,
        http_options={"host": config.host, "port": config.http_port},
    )
    running = http_listening(config.host)
    if running != config.http_port:
        where = "is off" if running is None else f"listens on port {running}"
        raise RuntimeError(
            f"Ray Serve already runs on this cluster and its HTTP proxy {where}: start this app "
            f"with http_port {running or 0}, or shut Serve down first (serve.shutdown())"
        )


def http_listening(host: str) -> int | None:
    """The port the running Serve's HTTP proxy listens on (None: no proxy, or another host)."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    location = ray.get(client._controller.get_proxy_location.remote())
    http = client.http_config
    if location == ProxyLocation.Disabled or http.host != host:
        return None
    return int(http.port)


def http_url(config: ServeConfig) -> str | None:
    """Base URL of the OpenAI API (``…/v1``), None when it is off."""
    if not config.http_port:
        return None
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"http://{host}:{config.http_port}/v1"


def serve_until_interrupted(
    config: ServeConfig,
    ray_address: str | None = None,
    registry: str | None = None,
    heldout: str | None = None,
) -> int:
    """``kiln serve``: join ``ray_address`` or start local Ray, start the orchestrator and deploy
    (``serve_orchestrator``: register, promote and roll back as under ``kiln up``), block until
    Ctrl-C (or SIGTERM), then shut the orchestrator, Serve and Ray down. Local Ray gets more
    logical CPUs than cores and every process one OpenMP thread: replicas, the gateway and the
    orchestrator ask for fractions (DESIGN.md)."""
    import sys
    import time

    import ray

    from kilnlm.actors import serve_orchestrator
    from kilnlm.actors.runtime_env import ENV

    env = {"env_vars": dict(ENV)}
    if ray_address is not None:
        ray.init(address=ray_address, runtime_env=env)
    else:
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, runtime_env=env)
    try:
        address, _ = serve_orchestrator.serve_with_orchestrator(config, registry, heldout)
        what = config.checkpoint or "no model (waiting for a promotion)"
        url = http_url(config)
        http = f" and {url} (OpenAI HTTP, model {config.model_id!r})" if url else ""
        print(f"kiln: serving {what} on {address} (grpc){http}; Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("kiln: stopping", file=sys.stderr)
        return 0
    finally:
        serve_orchestrator.stop(config.app_name)
        serve.shutdown()
        ray.shutdown()


def llm_handle(config: ServeConfig) -> serve.handle.DeploymentHandle:
    """A handle to the application's LLMServer deployment (the orchestrator's way in)."""
    return serve.get_deployment_handle("LLMServer", app_name=config.app_name)


__all__ = [
    "DeployError",
    "app_builder",
    "build_app",
    "deploy_failure",
    "deployment_options",
    "http_listening",
    "http_url",
    "llm_handle",
    "run",
    "serve_until_interrupted",
    "start_serve",
]
