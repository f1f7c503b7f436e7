"""The main job, ``kiln up``: train, validate, hot-swap and serve, in one Ray cluster, live.

This is what makes kilnlm one system. One function, ``run_up(config)``, sequences parts that each
live elsewhere and only wires them together:

1. Ray: joins the running cluster (``ray.is_initialized()``, or ``ray_address``) or starts a
   local one with more logical CPUs than cores (every piece asks for a fraction; DESIGN.md),
   every process with the environment of ``actors/runtime_env.py``.
2. Data: the embedded default corpus and its BPE tokenizer (``kilnlm.data.build_corpus``, through
   the launcher's ``prepare_data``: built once, reused while unchanged).
3. The orchestrator actor (``actors/orchestrator.py``) with the "auto" policy: every registered
   checkpoint is validated and, if it passes, hot-swapped into every replica.
4. Serving (``actors/serve_app.py``, the other application): LLM server replicas that start empty
   (NOT_SERVING) and pick up each promoted version through their swap agents, behind the gRPC
   gateway.
5. Training (``cluster/launcher.py``): Ray Train workers with FSDP2; after each export the
   trainer calls ``cluster.hooks.ActorHook``, which registers the checkpoint with the orchestrator.

Meanwhile a ``PromotionWatcher`` prints, after each promotion, a greedy generation of a fixed
prompt from the new version through the real gRPC client (a person watches the model improve),
and a bounded ``ClientLoad`` of streaming requests runs through the gateway, so the closing
summary can say honestly how many requests were served and failed across the swaps.

The loop cleans up what it deployed (the Serve application and the orchestrator actor) and
stops Ray only if it started it, so it runs inside a test session's Ray as well.

The modules, one job each: ``config`` (what to run), ``run`` (the stages), ``watch`` (the
promotion watcher and the client load), ``summary`` (the closing report), ``submit``
(``kiln up --cluster``: the same loop as a Ray job).
"""

from kilnlm.actors.up_app.config import (
    DEFAULT_PROMPT,
    UP_TRAIN,
    LoadConfig,
    UpConfig,
    default_job,
    default_serve,
)
from kilnlm.actors.up_app.run import run_up
from kilnlm.actors.up_app.submit import admin_token, submit_up
from kilnlm.actors.up_app.summary import UpSummary, VersionRow, is_settled, summarize
from kilnlm.actors.up_app.watch import ClientLoad, PromotionWatcher

__all__ = [
    "DEFAULT_PROMPT",
    "UP_TRAIN",
    "ClientLoad",
    "LoadConfig",
    "PromotionWatcher",
    "UpConfig",
    "UpSummary",
    "VersionRow",
    "admin_token",
    "default_job",
    "default_serve",
    "is_settled",
    "run_up",
    "submit_up",
    "summarize",
]
