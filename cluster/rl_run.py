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
        summary["toy"] = toy_verdict(toy, start, loop.records)
    return summary


TOY_TOLERANCE = 5.0
"""The toy must end with KL(πθ‖π*) at least this many times below KL(π0‖π*) (docs/rl.md)."""


def toy_verdict(toy: ToyPosterior, start: dict[str, float], records: list[IterationRecord]
                ) -> dict[str, Any]:  # fmt: skip
    """The exact check of a toy run: π*'s own figures, the start, the final and best
    KL(πθ‖π*), their ratio to the start and whether it meets ``TOY_TOLERANCE``."""
    target = toy.measure(toy.log_target)
    kls = [r.exact["kl_to_target"] for r in records]
    final, best = kls[-1], min(kls)
    return {
        "target": {"kl_to_reference": target.kl_to_reference, "mean_reward": target.mean_reward},
        "kl_start": start["kl_to_target"],
        "kl_final": final,
        "kl_best": best,
        "ratio": start["kl_to_target"] / final if final > 0 else float("inf"),
        "tolerance": TOY_TOLERANCE,
        "within_tolerance": final * TOY_TOLERANCE <= start["kl_to_target"],
    }


def plot_toy_betas(summaries: list[dict[str, Any]], path: Path) -> Path | None:
    """The three-β toy on one figure: KL(πθ‖π*) per update against the tolerance line, and the
    exact reward against KL(πθ‖π0) from π0 to the last version, with π* marked; None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for n, s in enumerate(summaries):
        color, rows, start, verdict = f"C{n}", s["iterations"], s["start"], s["toy"]
        kls = [start["kl_to_target"]] + [r["kl_to_target"] for r in rows]
        left.semilogy(range(len(kls)), kls, "o-", ms=3, color=color, label=f"β {s['beta']:g}")
        left.axhline(start["kl_to_target"] / verdict["tolerance"], color=color, ls=":", lw=1)
        path_kl = [0.0] + [r["kl_to_reference"] for r in rows]
        path_r = [start["exact_mean_reward"]] + [r["exact_mean_reward"] for r in rows]
        right.plot(path_kl, path_r, "o-", ms=3, color=color, label=f"β {s['beta']:g}: πθ")
        t = verdict["target"]
        right.plot([t["kl_to_reference"]], [t["mean_reward"]], "*", ms=14, color=color,
                   markeredgecolor="k", label=f"β {s['beta']:g}: π*")  # fmt: skip
    left.set_xlabel("updates (each: sample, Ray Train, export, gate, hot-swap)")
    left.set_ylabel("exact KL(πθ‖π*) (nats)")
    left.set_title("distance to the posterior (dotted: KL(π0‖π*)/5)")
    right.set_xlabel("exact KL(πθ‖π0) (nats)")
    right.set_ylabel("exact E_πθ[r]")
    right.set_title("reward against KL, π0 → last version")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_toy_json(path: Path, loop: RLLoop, spec: ToySpec) -> None:
    path.write_text(json.dumps(loop.toy_json(spec), indent=2) + "\n")


__all__ = [
    "RL_MAX_PPL_INCREASE",
    "TOY_TOLERANCE",
    "format_record",
    "plot_toy_betas",
    "run_live",
    "start_serving",
    "stop_serving",
    "toy_verdict",
]
