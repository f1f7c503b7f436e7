"""`kiln up` on a multi-node Ray cluster, and a worker node lost mid-run, twice.

``multinode_scenario.py`` (run in its own process: see its docstring for why) builds a
``ray.cluster_utils.Cluster`` of three nodes on this machine: a head carrying ``kiln_gateway``, a
trainer node (``kiln_trainer``) and a replica node (``kiln_replica``), and runs ``run_up`` against
it with ``--worker-resource kiln_trainer --replica-resource kiln_replica`` and the gateway
pinned to ``kiln_gateway``. Once training is past its first checkpoint the trainer node
crashes; once a version is promoted the replica node crashes; each is replaced by a new node
with the same resources (as the autoscaler of a ``ray up`` cluster would).

The promises checked: each part ran where its resource put it; the trainers came back on the
new node and resumed from a checkpoint (step > 0); both replicas came back on the new replica
node and answer with the promoted version; the background clients' failures, if any, are all
UNAVAILABLE (retryable); the run finished and promoted its checkpoints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from multinode_scenario import EVERY, STEPS

HERE = Path(__file__).resolve().parent
SCENARIO = HERE / "multinode_scenario.py"
TIMEOUT_S = 900
"""Bound on the whole scenario's process (a hang fails the test instead of blocking CI)."""


@pytest.fixture(scope="module")
def run(tiny_corpus, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("multinode")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Unix socket paths must stay short: a private folder directly under /tmp.
    with tempfile.TemporaryDirectory(prefix="kmn-", dir="/tmp") as ray_tmp:
        env["RAY_TMPDIR"] = ray_tmp  # the cluster's address file and sockets, not /tmp/ray
        cmd = [
            sys.executable,
            str(SCENARIO),
            "--data",
            str(tiny_corpus),
            "--storage",
            str(out / "runs"),
            "--out",
            str(out / "result.json"),
        ]
        log = out / "scenario.log"  # Ray's nodes write a lot there: a file, not a pipe
        with log.open("w") as sink:
            subprocess.run(
                cmd, env=env, cwd=out, stdout=sink, stderr=subprocess.STDOUT, timeout=TIMEOUT_S
            )
    path = out / "result.json"
    assert path.exists(), f"the scenario wrote no result; its log: {log}"
    result = json.loads(path.read_text())
    assert "error" not in result, f"{result['error']}\n(log: {log})"
    assert not result["drills"]["errors"], result["drills"]["errors"]
    return result


@pytest.mark.slow
def test_each_part_runs_on_the_node_its_resource_names(run) -> None:
    before = run["drills"]["before_trainer_loss"]
    assert before["trainers"] == ["trainer", "trainer"]
    assert before["replicas"] == ["replica", "replica"]
    assert before["gateway"] == ["head"]
    # Control plane on the driver's node, which no worker-node loss takes away.
    assert before["orchestrator"] == ["head"]
    assert before["train_controller"] == ["head"]
    assert before["metrics_sink"] == ["head"]


@pytest.mark.slow
def test_trainers_resume_from_a_checkpoint_on_the_replacement_node(run) -> None:
    drills, summary = run["drills"], run["summary"]
    assert drills["trainer_loss"]["at_step"] > EVERY
    assert drills["trainers_after"] == ["trainer-2", "trainer-2"]
    resumed = summary["resumed_from"]
    assert resumed > 0 and resumed % EVERY == 0, resumed
    # Not bounded by at_step: that is the driver's last metrics row before it removes the node,
    # and the ranks go on training until the node is gone; the restarted group resumes from the
    # newest intact checkpoint in the run folder (cluster.checkpointing.choose_resume), which
    # can be one written after at_step (CI saw 16 after at_step 12). It is never the last step.
    assert resumed < STEPS, resumed
    assert summary["training_error"] is None
    # Registered in order, from the first checkpoint (the drill waits for it) through the last
    # step. Not "each step once": a node lost between an export and its checkpoint's report
    # may lose that export, or repeat it after the resume; neither stops the run.
    steps = [v["step"] for v in summary["versions"]]
    assert steps == sorted(steps) and set(steps) <= set(range(EVERY, STEPS + 1, EVERY))
    assert steps[0] == EVERY and steps[-1] == STEPS, steps
    assert any(f"resumed from the checkpoint of step {resumed}" in ln for ln in run["lines"])


@pytest.mark.slow
def test_replicas_come_back_on_the_new_node_serving_the_promoted_version(run) -> None:
    drills = run["drills"]
    assert drills["before_replica_loss"]["replicas"] == ["replica", "replica"]
    assert drills["replicas_after"] == ["replica-2", "replica-2"]
    probe = drills["probe"]
    assert probe["version"] is not None, probe
    # The promoted version when it was asked (or the one promoted while it answered).
    assert probe["version"] in (probe["promoted_before"], probe["promoted_after"]), probe
    assert set(probe["retried_codes"]) <= {"UNAVAILABLE"}, probe


@pytest.mark.slow
def test_requests_during_the_replica_loss_fail_only_as_unavailable(run) -> None:
    """The drill's own streams, with their times: some were in flight or sent while no replica
    was up; each either got its answer or UNAVAILABLE (retryable), nothing else."""
    drills = run["drills"]
    lost, back = drills["replica_loss"]["removed_unix"], drills["replicas_back_unix"]
    requests = drills["outage_load"]
    during = [r for r in requests if r["start_unix"] < back and r["end_unix"] > lost]
    assert during, "no request was in flight while the replicas were gone"
    failed = Counter(r["error"] for r in requests if r["error"])
    assert set(failed) <= {"UNAVAILABLE"}, failed
    after = [r for r in requests if r["start_unix"] > back and not r["error"]]
    assert after, "no request was served by the replacement replicas"
    promoted = set(run["summary"]["promoted"])
    assert {r["version"] for r in requests if not r["error"]} <= promoted


@pytest.mark.slow
def test_kiln_ups_clients_see_only_retryable_failures_and_the_run_finishes(run) -> None:
    summary = run["summary"]
    assert set(summary["failures"]) <= {"UNAVAILABLE"}, summary["failures"]
    assert summary["requests_served"] > 0
    assert set(map(int, summary["requests_by_version"])) <= set(summary["promoted"])
    assert summary["settled"]
    # Promoted in order, at least once before and once after the losses (the first promotion
    # set the replica drill off), ending on the newest checkpoint that passed the gate.
    promoted = summary["promoted"]
    assert len(promoted) >= 2 and promoted == sorted(set(promoted)), promoted
    passed = [v["version"] for v in summary["versions"] if v["status"] != "rejected"]
    assert promoted[-1] == max(passed)
    assert summary["perplexity_falling"]
    assert any(ln.startswith("kiln up: summary") for ln in run["lines"])


# --------------------------------------------------------------------------------------------
# The placement options themselves, without a cluster


def test_worker_and_replica_resources_reach_what_ray_is_asked_for() -> None:
    from kilnlm.actors.serve_app import deployment_options
    from kilnlm.cluster.config import ClusterConfig
    from kilnlm.cluster.launcher import worker_resources
    from kilnlm.serving_config import ServeConfig

    assert worker_resources(ClusterConfig(), gpu=False) == {"CPU": 1.0}
    named = ClusterConfig(cpus_per_worker=8, worker_resource="kiln_trainer")
    assert worker_resources(named, gpu=True) == {"CPU": 8, "GPU": 1, "kiln_trainer": 1}
    assert "resources" not in deployment_options(ServeConfig())["ray_actor_options"]
    options = deployment_options(ServeConfig(replica_resource="kiln_replica"))
    assert options["ray_actor_options"]["resources"] == {"kiln_replica": 1}


@pytest.mark.parametrize("name", ["CPU", "GPU", "memory", " "])
def test_a_builtin_or_blank_resource_is_refused_naming_the_field(name: str) -> None:
    from kilnlm.cluster.config import ClusterConfig
    from kilnlm.serving_config import ServeConfig

    with pytest.raises(ValueError, match=r"ClusterConfig\.worker_resource"):
        ClusterConfig(worker_resource=name)
    with pytest.raises(ValueError, match="replica_resource"):
        ServeConfig(replica_resource=name)


def test_kiln_up_flags_name_the_resources_and_reach_the_job_on_the_head() -> None:
    from kilnlm.cli import build_parser
    from kilnlm.cli.up import forwarded_flags, up_config

    parser = build_parser()
    flags = ["--worker-resource", "kiln_trainer", "--replica-resource", "kiln_replica"]
    here = parser.parse_args(["up", "--cluster", "http://127.0.0.1:8265", *flags])
    head = parser.parse_args(["up", "--ray-address", "auto", *forwarded_flags(here)])
    config = up_config(head, token=None)
    assert config.job.cluster.worker_resource == "kiln_trainer"
    assert config.serve.replica_resource == "kiln_replica"
    plain = up_config(parser.parse_args(["up"]), token=None)
    assert (plain.job.cluster.worker_resource, plain.serve.replica_resource) == (None, None)
