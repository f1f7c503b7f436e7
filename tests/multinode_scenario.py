"""The multi-node scenario of ``test_multinode.py``, run as its own process.

    python tests/multinode_scenario.py --data CORPUS --storage DIR --out RESULT.json

Why a process of its own: ``ray.cluster_utils.Cluster`` starts a head and worker nodes (each its
own raylet and object store, on this machine) and the driver joins its head, while the pytest
process may already hold the session's one-node Ray (``conftest.ray_cluster``) for the rest of
the suite. Tearing that down and bringing it back around one module would leave every later
test's fixture pointing at a dead cluster; a child process has its own ``ray`` module state, and
the test only reads the JSON it writes. ``RAY_TMPDIR`` (set by the test) keeps this cluster's
address file and sockets out of /tmp/ray, so no other Ray started on this machine (``ray.init()``
looks there) joins it by accident. Cluster's reaper kills the nodes if this process dies.

The cluster (logical resources, sized for 2 real cores):

- head: 4 CPUs and ``kiln_gateway`` (the gRPC gateway asks for it; the driver, the orchestrator,
  Serve's and Ray Train's controllers live here too);
- trainer node: 2 CPUs and ``kiln_trainer: 2`` (``ClusterConfig.worker_resource``);
- replica node: 1 CPU and ``kiln_replica: 2`` (``ServeConfig.replica_resource``).

``kiln up``'s own ``run_up`` joins it (``UpConfig.ray_address``) and runs the whole loop. Two
drills run beside it, each as a node loss looks on a cloud cluster (a crash: no graceful
shutdown), each followed by a replacement node with the same resources, as the autoscaler of a
``ray up`` cluster would launch:

- the trainer node, once the driver's metrics show a step past the first checkpoint (so the
  checkpoint is in Ray Train's list): the trainers must resume from it on the new node;
- the replica node, once the first version is promoted and the background clients stream: Serve
  must start both replicas on the new node, where the orchestrator brings them to the promoted
  version before they serve.

A replacement node, rather than giving the surviving worker node the lost node's resource from
the start: with both nodes advertising it, Ray may place the trainers (or replicas) on either,
and the first half of the test (trainers on one node, replicas on another) would prove nothing.

The JSON holds what the test asserts on: where every part ran before and after, the drills'
times, the replicas' recovery and a probe request's version, and run_up's summary.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

APP = "kiln-test-multinode"
TRAINER, REPLICA, GATEWAY = "kiln_trainer", "kiln_replica", "kiln_gateway"
STEPS, EVERY, LOG_EVERY = 24, 8, 2
WAIT_S = 420.0
"""Bound on every wait of a drill: generous (other Ray tests share these 2 cores), never a
measurement; a wait that runs out is recorded and the test fails on what is missing."""

OUTAGE_LOAD_ARGS = {"clients": 2, "max_tokens": 16, "pause_s": 0.2, "timeout_s": 240.0}
"""The drill's own streams: a generous deadline, so a request that waits in Serve's queue while
no replica is up ends with what the system says, not with the client giving up."""

ENV = {
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Restarting the worker group on the replacement node includes starting two processes
    # that import torch: slow on 2 busy cores, well past Ray Train's 60 s default.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
}
"""This process's environment (where not set already), which the nodes it starts inherit."""

HEAD = {
    "num_cpus": 4,
    "resources": {GATEWAY: 1},
    "include_dashboard": False,
    # A crashed node is declared dead after ~3 s instead of ~30 s (Ray's own tests do the same).
    "_system_config": {
        "health_check_initial_delay_ms": 0,
        "health_check_period_ms": 1000,
        "health_check_failure_threshold": 3,
    },
}
TRAINER_NODE = {"num_cpus": 2, "resources": {TRAINER: 2}}
REPLICA_NODE = {"num_cpus": 1, "resources": {REPLICA: 2}}


def up_config(data: str, storage: str, address: str) -> Any:
    from kilnlm.actors.up_app import LoadConfig, UpConfig, default_serve
    from kilnlm.cluster.config import ClusterConfig, JobConfig
    from kilnlm.train import TrainConfig

    train = TrainConfig(
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=2,
        max_steps=STEPS,
        batch_size=4,
        seq_len=64,
        eval_every=EVERY,
        eval_batches=2,
        log_every=LOG_EVERY,
        checkpoint_every=EVERY,
    )
    cluster = ClusterConfig(
        workers=2,
        cpus_per_worker=1.0,
        worker_resource=TRAINER,
        storage_path=storage,
        name="multinode",
        progress=False,
        max_failures=3,
        checkpoint_upload="sync",
    )
    job = JobConfig(
        preset="test-1m", model={"block_size": 128}, train=train, cluster=cluster, data_dir=data
    )
    serve = replace(
        default_serve(),
        port=0,
        http_port=0,
        app_name=APP,
        replica_num_cpus=0.5,
        replica_resource=REPLICA,
        gateway_resources={GATEWAY: 1},
    )
    return UpConfig(
        job=job,
        serve=serve,
        # Generous per-request deadline: while both replicas are gone a request waits in Serve's
        # queue for the new ones; the test wants to see how it ends, not a client's deadline.
        load=LoadConfig(clients=1, max_tokens=16, pause_s=0.5, timeout_s=240.0),
        prompt_tokens=16,
        exit_after=0,
        ray_address=address,
        settle_timeout_s=WAIT_S,
    )


# --------------------------------------------------------------------------------------------
# Where things run


def alive_actors() -> list[dict[str, Any]]:
    """Every live actor: class, name, node (the GCS's actor table; no dashboard needed)."""
    import ray._private.state

    table = ray._private.state.actors(actor_state_name="ALIVE")
    return [
        {"class": a["ActorClassName"], "name": a["Name"], "node": a["Address"]["NodeID"]}
        for a in table.values()
    ]


def placement(node_names: dict[str, str]) -> dict[str, list[str]]:
    """Role → the names of the nodes its live actors run on (``other`` for an unknown node)."""
    roles = {
        "trainers": lambda a: a["class"] == "RayTrainWorker",
        "replicas": lambda a: a["class"] == f"ServeReplica:{APP}:LLMServer",
        "gateway": lambda a: a["class"] == f"ServeReplica:{APP}:Gateway",
        "orchestrator": lambda a: a["class"] == "Orchestrator",
        "train_controller": lambda a: a["class"] == "TrainController",
        "metrics_sink": lambda a: a["class"] == "MetricsSink",
    }
    actors = alive_actors()
    return {
        role: sorted(node_names.get(a["node"], "other") for a in actors if match(a))
        for role, match in roles.items()
    }


def metrics_step(run_dir: Path) -> int:
    """The last step in the driver's metrics.csv (0 before the first report)."""
    import csv

    path = run_dir / "metrics.csv"
    try:
        rows = list(csv.DictReader(path.open()))
    except (FileNotFoundError, csv.Error):
        return 0
    steps = [int(float(r["step"])) for r in rows if r.get("step")]
    return max(steps, default=0)


ABORT = threading.Event()
"""Set when kiln up ended with an error: the drills stop waiting for what will not come."""


def registered() -> int:
    """Checkpoints the orchestrator holds (0 before it runs)."""
    import ray

    from kilnlm.actors.orchestrator import get_orchestrator

    try:
        status = ray.get(get_orchestrator(APP).status.remote(), timeout=60)
    except (ValueError, ray.exceptions.GetTimeoutError):  # not started yet, or busy
        return 0
    return len(status.checkpoints)


def wait_for(predicate: Any, timeout: float = WAIT_S, period: float = 0.25) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and not ABORT.is_set():
        if predicate():
            return True
        time.sleep(period)
    return bool(predicate())


# --------------------------------------------------------------------------------------------
# The drills


class MainThread:
    """Runs node changes on the main thread: Ray's ``Node`` installs a SIGTERM handler (main
    thread only) and starts its processes with a parent-death signal, which would kill a node
    whose starting thread ended. The drills' threads hand their node changes here."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Any, Future[Any]]] = queue.Queue()

    def call(self, fn: Any) -> Any:
        done: Future[Any] = Future()
        self.calls.put((fn, done))
        return done.result()

    def serve_while(self, *threads: threading.Thread, timeout: float = float("inf")) -> None:
        end = time.monotonic() + timeout
        while any(t.is_alive() for t in threads) and time.monotonic() < end:
            try:
                fn, done = self.calls.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                done.set_result(fn())
            except BaseException as e:
                done.set_exception(e)


class Drills:
    """Lose the trainer node, then the replica node, each replaced at once; record everything."""

    def __init__(self, cluster: Any, nodes: dict[str, Any], run_dir: Path, main: MainThread):
        self.cluster, self.nodes, self.run_dir, self.main = cluster, nodes, run_dir, main
        self.names = {node.node_id: name for name, node in nodes.items()}
        self.promoted = threading.Event()
        self.address = ""
        self.record: dict[str, Any] = {"errors": []}
        drill = {"target": self._guard, "daemon": True}
        self.trainer_thread = threading.Thread(args=(self.trainer_drill,), **drill)
        self.replica_thread = threading.Thread(args=(self.replica_drill,), **drill)
        self.threads = (self.trainer_thread, self.replica_thread)

    def start(self) -> None:
        self.trainer_thread.start()
        self.replica_thread.start()

    def join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for t in (self.trainer_thread, self.replica_thread):
            t.join(max(0.0, end - time.monotonic()))

    def _guard(self, drill: Any) -> None:
        try:
            drill()
        except Exception:
            self.record["errors"].append(traceback.format_exc())

    def replace_node(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Crash node ``name`` (no graceful shutdown) and start ``name``-2 with its resources."""
        lost = self.nodes[name]
        t = time.time()
        self.main.call(lambda: self.cluster.remove_node(lost, allow_graceful=False))
        new = self.main.call(lambda: self.cluster.add_node(**args))
        self.nodes[name + "-2"] = new
        self.names[new.node_id] = name + "-2"
        return {"lost": name, "removed_unix": t, "replacement_unix": time.time()}

    def trainer_drill(self) -> None:
        # Past the first checkpoint in the driver's metrics (the controller has taken that
        # step's report, so the checkpoint is in Ray Train's list when the node goes) and its
        # export registered (so a version exists to promote before and after the loss).
        if not wait_for(lambda: metrics_step(self.run_dir) > EVERY and registered() >= 1):
            self.record["errors"].append("no step past the first checkpoint, or no export")
            return
        self.record["before_trainer_loss"] = placement(self.names)
        self.record["trainer_loss"] = {
            "at_step": metrics_step(self.run_dir),
            **self.replace_node("trainer", TRAINER_NODE),
        }
        self.record["trainers_after"] = self._back("trainers", "trainer")

    def replica_drill(self) -> None:
        from kilnlm.actors.up_app import ClientLoad, LoadConfig

        if not wait_for(self.promoted.is_set):
            self.record["errors"].append("no version was promoted")
            return
        # A load of our own beside kiln up's, whose records keep their times: which requests
        # were in flight or sent while the replicas were gone, and how each ended.
        serving = threading.Event()
        serving.set()
        load = ClientLoad(self.address, LoadConfig(**OUTAGE_LOAD_ARGS), serving).start()
        time.sleep(2.0)  # streams in flight on the replicas when their node goes
        self.record["before_replica_loss"] = placement(self.names)
        self.record["replica_loss"] = self.replace_node("replica", REPLICA_NODE)
        replicas = self._back("replicas", "replica")
        self.record["replicas_after"] = replicas
        self.record["replicas_back_unix"] = time.time()
        self.record["probe"] = self._probe()
        time.sleep(2.0)  # a few requests on the recovered replicas
        load.stop()
        self.record["outage_load"] = [asdict(r) for r in load.requests]

    def _back(self, role: str, lost: str) -> list[str]:
        """The nodes of ``role``'s two actors once both run again, none on node ``lost``
        (until the GCS declares that node dead its actors are still listed alive)."""

        def back() -> bool:
            where = placement(self.names)[role]
            return len(where) == 2 and lost not in where

        return placement(self.names)[role] if wait_for(back) else []

    def _probe(self) -> dict[str, Any]:
        """One greedy request through the gateway once a replica serves again: the version that
        answers, and the promoted version read before and after it (a promotion may land
        between). UNAVAILABLE while the new replicas load the promoted version is retried."""
        import grpc
        import ray

        from kilnlm.actors.orchestrator import get_orchestrator
        from kilnlm.client import Client

        orchestrator = get_orchestrator(APP)
        codes: list[str] = []
        end = time.monotonic() + WAIT_S
        with Client(self.address, timeout=120) as client:
            while time.monotonic() < end:
                before = ray.get(orchestrator.status.remote(), timeout=60).promoted_version
                try:
                    out = client.generate("def main():\n", temperature=0, max_tokens=4)
                except grpc.RpcError as e:
                    codes.append(e.code().name)
                    time.sleep(1.0)
                    continue
                after = ray.get(orchestrator.status.remote(), timeout=60).promoted_version
                return {
                    "version": out.finish.model_version,
                    "promoted_before": before,
                    "promoted_after": after,
                    "retried_codes": codes,
                }
        return {"version": None, "retried_codes": codes}


# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a built corpus folder")
    parser.add_argument("--storage", required=True, help="storage_path of the run")
    parser.add_argument("--out", required=True, help="where the JSON result goes")
    args = parser.parse_args()
    if "RAY_TMPDIR" not in os.environ:
        parser.error("set RAY_TMPDIR to a short private folder (see the module docstring)")
    for name, value in ENV.items():
        os.environ.setdefault(name, value)

    from ray.cluster_utils import Cluster

    result: dict[str, Any] = {}
    cluster = Cluster(initialize_head=True, head_node_args=HEAD)
    try:
        nodes = {
            "head": cluster.head_node,
            "trainer": cluster.add_node(**TRAINER_NODE),
            "replica": cluster.add_node(**REPLICA_NODE),
        }
        cluster.wait_for_nodes()
        config = up_config(args.data, args.storage, cluster.address)
        main_thread = MainThread()
        drills = Drills(cluster, nodes, config.run_dir, main_thread)
        up = threading.Thread(target=run_loop, args=(config, drills, result), name="kiln-up")
        drills.start()
        up.start()
        main_thread.serve_while(up)  # node changes happen here, on the main thread
        if "error" in result:
            ABORT.set()
        main_thread.serve_while(*drills.threads, timeout=WAIT_S)
        result.update(
            nodes={name: node.node_id for name, node in drills.nodes.items()},
            drills=drills.record,
        )
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
        cluster.shutdown()
    return 0 if "error" not in result else 1


def run_loop(config: Any, drills: Drills, result: dict[str, Any]) -> None:
    """``run_up`` (kiln up joining the cluster), on its own thread; its summary into ``result``."""
    from kilnlm.actors.up_app import run_up

    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        print(line, flush=True)
        if line.startswith("[kiln up] serving on "):
            drills.address = line.split()[4]
        if line.startswith("── version") and "promoted" in line.split(":")[0]:
            drills.promoted.set()
        if line.startswith("kiln up: summary"):
            # The summary is printed before run_up removes the application: hold it here
            # until the drills have seen the replicas come back and probed them.
            drills.join(WAIT_S)

    try:
        result["summary"] = run_up(config, say=say).to_dict()
    except Exception:
        result["error"] = traceback.format_exc()
    result["lines"] = lines


if __name__ == "__main__":
    sys.exit(main())
