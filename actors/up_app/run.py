"""``run_up``: the stages of ``kiln up`` in order (see the package docstring), and their cleanup."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from kilnlm.actors.runtime_env import runtime_env
from kilnlm.actors.up_app.config import UpConfig
from kilnlm.actors.up_app.summary import UpSummary, is_settled, summarize
from kilnlm.actors.up_app.watch import ClientLoad, PromotionWatcher
from kilnlm.energy import EnergyMeter, EnergyReport


def connect_ray(config: UpConfig) -> bool:
    """Use the Ray this process already has, join ``ray_address``, or start a local one.

    Returns whether this call started Ray (then the loop stops it at the end)."""
    import ray

    if ray.is_initialized():
        return False
    env = runtime_env()  # None inside a Ray job: the job's own applies
    # Worker logs stay in Ray's session folder: streamed here they would bury the progress bar
    # and the generations. Failures still reach the summary (rejection reasons, errors).
    if config.ray_address is not None:
        ray.init(address=config.ray_address, runtime_env=env, log_to_driver=False)
    else:
        cpus = max(config.ray_num_cpus, os.cpu_count() or 1)
        # "local": a new cluster of our own, even if another one on this machine could be found
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env=env,
        )
    return True


class UpRun:
    """One run of the loop; ``run_up`` drives it. Each method is one stage."""

    def __init__(self, config: UpConfig, say: Callable[[str], None]) -> None:
        self.config, self.say = replace(config), say  # a copy: stages fill in data_dir
        self.started = time.perf_counter()
        self.started_ray = False
        self.orchestrator: Any = None
        self.deployed = False
        self.address = ""
        self.watcher: PromotionWatcher | None = None
        self.load: ClientLoad | None = None
        self.train_s = 0.0
        self.train_energy: EnergyReport | None = None
        self.serve_meter: EnergyMeter | None = None
        self.train_end_unix = 0.0
        self.training_error: str | None = None
        self.resumed_from = 0
        self.ngram: dict[str, Any] | None = None

    def connect(self) -> None:
        self.started_ray = connect_ray(self.config)

    def prepare_data(self) -> None:
        """Build (or reuse) the corpus and tokenizer; training and the gate read the same one."""
        from kilnlm.cluster.launcher import prepare_data

        job = self.config.job
        t = time.perf_counter()
        data_dir, _ = prepare_data(job, progress=job.cluster.progress)
        self.config.job = replace(job, data_dir=os.path.abspath(data_dir))
        self.say(f"[kiln up] corpus and tokenizer: {data_dir} ({time.perf_counter() - t:.0f} s)")

    def baseline(self) -> None:
        """Fit the n-gram baseline on the training split and score it on the held-out tokens
        the gate scores every checkpoint on, so the summary compares like with like."""
        from kilnlm.actors.orchestrator import heldout_ids
        from kilnlm.ngram import best_baseline
        from kilnlm.shards import TokenShards
        from kilnlm.tokenizer import Tokenizer

        orders = self.config.ngram_orders
        if not orders:
            return
        t = time.perf_counter()
        data_dir = str(self.config.job.data_dir)
        train = TokenShards(data_dir, "train")
        ids, n_bytes = heldout_ids(data_dir, Tokenizer.load(data_dir), self.config.heldout_tokens)
        base = best_baseline(train.read(0, len(train)), ids, n_bytes, train.vocab_size, orders)
        r = base.result
        self.ngram = {
            "order": base.order,
            "perplexity": r.perplexity,
            "bits_per_byte": r.bits_per_byte,
            "tokens": r.tokens,
        }
        self.say(
            f"[kiln up] baseline to beat: {base.name}, held-out ppl {r.perplexity:.2f} "
            f"({r.bits_per_byte:.3f} bits/byte) on {r.tokens:,} tokens, best of orders "
            f"{', '.join(map(str, base.by_order))} ({time.perf_counter() - t:.0f} s)"
        )

    def start_orchestrator(self) -> None:
        from kilnlm.actors.orchestrator import OrchestratorConfig, start_orchestrator

        config = OrchestratorConfig(
            storage_path=self.config.registry_uri,
            heldout=str(self.config.job.data_dir),
            app_name=self.config.serve.app_name,
            policy="auto",
            max_ppl_increase=self.config.max_ppl_increase,
            heldout_max_tokens=self.config.heldout_tokens,
            smoke_prompt=self.config.prompt,
        )
        check_no_foreign_orchestrator(self.config)
        self.orchestrator = start_orchestrator(config)
        self.say(f"[kiln up] orchestrator: auto-promote, registry in {config.storage_path}")

    def deploy(self) -> None:
        from kilnlm.actors import serve_app

        serve = self.config.serve
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines bury ours
        self.deployed = True  # from here on, a failure still deletes what serve.run made
        self.address = serve_app.run(serve)
        url = serve_app.http_url(serve)
        http = f" and {url} (OpenAI HTTP, model {serve.model_id!r})" if url else ""
        self.say(
            f"[kiln up] serving on {self.address} (gRPC){http}: {serve.num_replicas} replicas, "
            "empty until the first promotion"
        )
        self.watcher = PromotionWatcher(self.orchestrator, self.address, self.config, self.say)
        self.watcher.start()
        self.load = ClientLoad(self.address, self.config.load, self.watcher.serving).start()

    def train(self) -> None:
        from kilnlm.actors.swap_messages import ORCHESTRATOR_NAMESPACE, orchestrator_name
        from kilnlm.cluster.hooks import ActorHook
        from kilnlm.cluster.launcher import launch

        hook = ActorHook(orchestrator_name(self.config.serve.app_name), ORCHESTRATOR_NAMESPACE)
        job = self.config.job
        self.say(
            f"[kiln up] training {job.preset} on {job.cluster.workers} Ray Train workers (FSDP2), "
            f"{job.train.max_steps} steps, a checkpoint every {job.train.checkpoint_every}"
        )
        t = time.perf_counter()
        meter = EnergyMeter("machine", self.config.energy)  # every Ray worker of the run
        result = launch(job, hook=hook, raise_on_error=False)
        self.train_s = time.perf_counter() - t
        self.train_energy = meter.report()
        self.serve_meter = EnergyMeter("machine", self.config.energy)  # serving from here on
        self.train_end_unix = time.time()
        if result.error is not None:
            self.training_error = f"{type(result.error).__name__}: {result.error}"
        self.resumed_from = int((result.worker_result or {}).get("resumed_from") or 0)
        if self.resumed_from:
            self.say(
                f"[kiln up] the trainers were restarted (a worker or its node was lost) and "
                f"resumed from the checkpoint of step {self.resumed_from}"
            )
        errors = (result.worker_result or {}).get("hook_errors") or []
        for e in errors:
            self.say(f"[kiln up] registration failed: {e}")

    def settle(self) -> bool:
        """Wait until the orchestrator has dealt with every registered checkpoint."""
        assert self.watcher is not None
        deadline = time.monotonic() + self.config.settle_timeout_s
        while time.monotonic() < deadline:
            if is_settled(self.watcher.refresh()):
                time.sleep(2 * self.config.status_poll_s)  # let the watcher show the last one
                return True
            time.sleep(self.config.status_poll_s)
        return False

    def summary(self, settled: bool) -> UpSummary:
        assert self.watcher is not None
        if self.load is not None:
            self.load.stop()
        self.watcher.stop()
        summary = summarize(
            self.watcher.refresh(),
            self.load,
            self.watcher,
            run_dir=str(self.config.run_dir),
            address=self.address,
            train_s=self.train_s,
            total_s=time.perf_counter() - self.started,
            settled=settled,
            training_error=self.training_error,
            resumed_from=self.resumed_from,
            ngram=self.ngram,
            energy=self.energy(),
        )
        path = self.config.run_dir / "up-summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary.to_dict(), indent=2, default=str))
        return summary

    def energy(self) -> dict[str, Any] | None:
        """Training's energy, and serving's after training per 1,000 generated tokens (the
        machine while only serving, gate included, over the tokens the load got meanwhile)."""
        if self.train_energy is None or self.serve_meter is None:
            return None
        records = self.load.requests if self.load is not None else []
        tokens = sum(
            r.tokens for r in records if not r.error and r.start_unix >= self.train_end_unix
        )
        serving = self.serve_meter.report(tokens=tokens or None)
        return {"train": self.train_energy.to_dict(), "serving": serving.to_dict()}

    def serve_on(self) -> None:
        """Keep serving after the summary: ``exit_after`` seconds, or until Ctrl-C."""
        exit_after = self.config.exit_after
        if exit_after == 0:
            return
        how = "Ctrl-C to stop" if exit_after is None else f"stopping in {exit_after:.0f} s"
        self.say(
            f"[kiln up] still serving on {self.address} ({how}); try:\n"
            f"  kiln generate --address {self.address} 'def main():' --max-tokens 64 "
            "--temperature 0 --stream\n"
            f"  kiln status --address {self.address}      # needs $KILN_ADMIN_TOKEN"
        )
        deadline = float("inf") if exit_after is None else time.monotonic() + exit_after
        while time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        """Remove what this run deployed; stop Ray if this run started it.

        Quick on purpose: on SIGTERM (``ray job stop``) Ray turns the signal into SystemExit and
        allows a few seconds before SIGKILL, so nothing here waits on a client or a generation.
        """
        import ray
        from ray import serve

        for part in (self.load, self.watcher):
            if part is not None:
                part.stop(wait=False)
        if self.orchestrator is not None:
            with contextlib.suppress(Exception):  # already gone with Ray
                ray.kill(self.orchestrator, no_restart=True)
        if self.deployed:
            try:
                serve.delete(self.config.serve.app_name)
            except Exception as e:  # best effort: Ray may be going down already
                self.say(f"[kiln up] could not delete the Serve application: {e}")
        if self.started_ray:  # Serve goes down with Ray (its app was deleted above)
            ray.shutdown()


def check_no_foreign_orchestrator(config: UpConfig) -> None:
    """Refuse to adopt a running orchestrator of the same application that holds another run's
    checkpoints (a detached actor outlives its job): its registry is not this run's."""
    import ray

    from kilnlm.actors.orchestrator import get_orchestrator

    try:
        existing = get_orchestrator(config.serve.app_name)
    except ValueError:
        return
    status = ray.get(existing.status.remote(), timeout=30)
    ours = config.run_uri
    foreign = [r.path for r in status.checkpoints if not r.path.startswith(ours)]
    if foreign:
        raise ValueError(
            f"an orchestrator for the Serve application {config.serve.app_name!r} is already "
            f"running with checkpoints of another run ({foreign[0]}); resume that run (same "
            "--name and --storage-path), pick another --app-name, or stop it first "
            "(serve shutdown, then ray.kill on it)"
        )


def run_up(config: UpConfig, say: Callable[[str], None] | None = None) -> UpSummary:
    """The whole loop (module docstring): returns the summary it printed."""
    say = say or _say
    up = UpRun(config, say)
    try:
        up.connect()
        up.prepare_data()
        up.baseline()
        up.start_orchestrator()
        up.deploy()
        up.train()
        settled = up.settle()
        summary = up.summary(settled)
        say(summary.format())
        up.serve_on()
        return summary
    finally:
        up.close()


def _say(message: str) -> None:
    """Print above the training progress bar rather than through it."""
    from tqdm.auto import tqdm

    tqdm.write(message)
