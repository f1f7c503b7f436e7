"""``kiln rl``'s run: start serving (orchestrator first, then the replicas), drive ``RLLoop`` for
the iterations, write ``metrics.csv`` (and ``toy.json`` on the toy), stop serving.

The replicas, the orchestrator and Ray Train share one local Ray (or the cluster at
``RAY_ADDRESS``). The orchestrator's gate still checks checksums, loading and the smoke text of
every new policy; its perplexity margin (``max_ppl_increase``) is opened wide, because moving
away from π0's held-out text is what RL is asked to do (the KL term is what bounds it).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kilnlm.cluster.rl import IterationRecord, RLLoop, RLLoopConfig
from kilnlm.cluster.rl_watch import RunWatch
from kilnlm.rl.toy import ToyPosterior, ToySpec

RL_MAX_PPL_INCREASE = 100.0
"""The gate's held-out perplexity margin during RL (see the module docstring)."""


def start_serving(cfg: RLLoopConfig, app: str, heldout: str) -> tuple[Any, Any, int]:
    """(LLMServer handle, orchestrator, π0's version): π0 registered, gated and promoted."""
    from kilnlm.actors import serve_app, serve_orchestrator
    from kilnlm.actors.orchestrator import OrchestratorConfig, start_orchestrator
    from kilnlm.engine import EngineConfig
    from kilnlm.serving_config import ServeConfig

    out = Path(cfg.out).absolute()
    orchestrator = start_orchestrator(
        OrchestratorConfig(
            storage_path=str(out / "registry"), heldout=heldout, app_name=app,
            max_ppl_increase=RL_MAX_PPL_INCREASE, smoke_tokens=4,
        )
    )  # fmt: skip
    config = ServeConfig(
        checkpoint=str(Path(cfg.policy).absolute()), port=0, http_port=0, app_name=app,
        num_replicas=1, replica_num_cpus=0.5,
        engine=EngineConfig(kv_budget_mib=16, max_tokens_limit=max(cfg.max_tokens, 16)),
    )  # fmt: skip
    serve_app.run(config)
    version, outcome = serve_orchestrator.adopt(orchestrator, config.checkpoint)
    if outcome != "promoted":
        raise RuntimeError(f"π0 {cfg.policy} could not be served: {outcome}")
    return serve_app.llm_handle(config), orchestrator, version


def stop_serving(app: str) -> None:
    from ray import serve

    from kilnlm.actors import serve_orchestrator

    serve.delete(app)
    serve_orchestrator.stop(app)


def row(record: IterationRecord) -> dict[str, Any]:
    d = asdict(record)
    return {**{k: v for k, v in d.items() if k != "exact"}, **d["exact"]}


def write_csv(path: Path, records: list[IterationRecord]) -> None:
    rows = [row(r) for r in records]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_reward_kl(records: list[IterationRecord], path: Path, title: str = "") -> Path | None:
    """Mean reward against KL(πθ‖π0) of the served policy per iteration (the exact figures of
    the new version on the toy, else the samples' estimate); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r.kl_estimate for r in records], [r.mean_reward for r in records], "o-",
            label="served samples (estimate)")  # fmt: skip
    exact = [(r.exact["kl_to_reference"], r.exact["exact_mean_reward"]) for r in records if r.exact]
    if exact:
        ax.plot(*zip(*exact, strict=True), "s--", label="new version (exact, toy)")
    ax.set_xlabel("KL(πθ‖π0) (nats)")
    ax.set_ylabel("mean reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_record(r: IterationRecord) -> str:
    line = (
        f"iter {r.iteration:>3}  v{r.version}->v{r.new_version}  reward {r.mean_reward:.3f}  "
        f"KL(πθ‖π0)~{r.kl_estimate:.3f}  used {r.used} dropped {r.dropped}  "
        f"train {r.train_s:.1f}s swap {r.swap_s:.1f}s"
    )
    if r.exact:
        line += f"  KL(πθ‖π*) {r.exact['kl_to_target']:.4f}  TV {r.exact['total_variation']:.3f}"
    return line


def run_live(
    cfg: RLLoopConfig,
    heldout: str,
    toy: ToyPosterior | None = None,
    app: str = "kiln-rl",
    say: Callable[[str], None] = print,
    clients: bool = True,
) -> dict[str, Any]:
    """The whole run; returns the JSON summary (``metrics.csv``/``toy.json`` are in ``cfg.out``).
    ``clients``: a background gRPC client streams through the gateway all along (``RunWatch``)."""
    from kilnlm.cluster.launcher import ensure_ray

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_ray(4)
    handle, orchestrator, version = start_serving(cfg, app, heldout)
    watch = loop = None
    try:
        watch = RunWatch(cfg, app, handle, version, clients)
        loop = RLLoop(cfg, handle, orchestrator, version, toy, say)
        start = loop.exact(loop.exports[version])
        for i in range(cfg.iterations):
            say(format_record(loop.iterate(i)))
            write_csv(out / "metrics.csv", loop.records)
        watch.finish(loop)
    finally:
        if loop is not None:
            loop.close()
        if watch is not None:
            watch.close()
        stop_serving(app)
    summary: dict[str, Any] = {
        "beta": cfg.beta,
        "metrics_csv": str(out / "metrics.csv"),
        "start": start,
        "iterations": [row(r) for r in loop.records],
        "versions": loop.toy_json(toy.spec)["versions"] if toy else None,
        **watch.summary(loop),
    }
    png = plot_reward_kl(loop.records, out / "reward-kl.png", f"kiln rl, β {cfg.beta:g}")
    summary["png"] = None if png is None else str(png)
    if toy is not None:
        write_toy_json(out / "toy.json", loop, toy.spec)
        summary["toy_json"] = str(out / "toy.json")
    return summary


def write_toy_json(path: Path, loop: RLLoop, spec: ToySpec) -> None:
    path.write_text(json.dumps(loop.toy_json(spec), indent=2) + "\n")


__all__ = ["RL_MAX_PPL_INCREASE", "format_record", "run_live", "start_serving", "stop_serving"]
