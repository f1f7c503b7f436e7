"""``kiln serve``'s orchestrator: the same gate, swap and registry as ``kiln up``, no training.

``kiln serve --checkpoint A`` starts the application's orchestrator (policy "manual") before the
replicas, then registers A and promotes it: the replicas serve A already, so the swap loads
nothing, but from then on the registry says what serves and ``kiln rollback`` can return to A.
Checkpoints made anywhere else come in through ``kiln register B`` (``Admin.Register``) and go
live with ``kiln promote 2``, through the gate and the two-phase swap, as under ``kiln up``.

The gate needs held-out text: ``--heldout`` (a corpus folder built by ``kiln corpus`` / ``kiln
up``, or a text file); without it, the held-out documents of the embedded default corpus (the
standard library's sources whose ``heldout_score`` puts them in its held-out split, so a model
trained on the default corpus never saw them), written once into the registry's folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from kilnlm.checkpoint import remote
from kilnlm.serving_config import ServeConfig

DEFAULT_HELDOUT_BYTES = 64_000
"""Text enough for the gate's default 4,096 held-out tokens several times over."""
ADOPT_TIMEOUT_S = 600.0
"""How long ``kiln serve`` waits for the gate and the (no-op) swap of its own checkpoint."""


def default_registry(app_name: str) -> str:
    """Where ``kiln serve`` keeps the registry unless told: beside ``kiln up``'s runs."""
    return os.path.abspath(os.path.join("runs", f"serve-{app_name}"))


def default_heldout(directory: Path, min_bytes: int = DEFAULT_HELDOUT_BYTES) -> Path:
    """``directory/heldout.txt``: the default corpus's held-out documents (written once)."""
    from kilnlm.data import CorpusConfig, heldout_score
    from kilnlm.documents import default_corpus

    file = directory / "heldout.txt"
    if file.is_file():
        return file
    fraction = CorpusConfig().heldout_fraction
    parts: list[str] = []
    size = 0
    for doc in default_corpus():
        if heldout_score(doc.text) < fraction:
            parts.append(doc.text)
            size += len(doc.text.encode("utf-8"))
            if size >= min_bytes:
                break
    directory.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    tmp.write_text("\n\n".join(parts), encoding="utf-8")
    os.replace(tmp, file)
    return file


def start(config: ServeConfig, registry: str, heldout: str | None) -> Any:
    """Start (or find) the application's orchestrator with a manual policy; returns its handle."""
    from kilnlm.actors.orchestrator import OrchestratorConfig, start_orchestrator

    data = heldout or str(default_heldout(Path(registry)))
    return start_orchestrator(
        OrchestratorConfig(storage_path=registry, heldout=data, app_name=config.app_name)
    )


def adopt(orchestrator: Any, checkpoint: str) -> tuple[int, str]:
    """Register and promote the checkpoint the replicas started with; (version, what happened).

    A checkpoint the gate refuses keeps serving (it was asked for), and the reason is returned.
    """
    import ray

    version = ray.get(orchestrator.register.remote(checkpoint), timeout=60)
    try:
        ray.get(orchestrator.promote.remote(version), timeout=ADOPT_TIMEOUT_S)
    except Exception as e:  # the gate or the swap refused it: say why, keep serving
        return version, f"not promoted ({type(e).__name__}: {e})"
    return version, "promoted"


def serve_with_orchestrator(
    config: ServeConfig,
    registry: str | None = None,
    heldout: str | None = None,
    say: Callable[[str], None] = print,
) -> tuple[str, Any]:
    """Orchestrator first, then the replicas (they attach to it as they start), then adopt
    ``config.checkpoint``. Returns the gateway's address and the orchestrator's handle."""
    from kilnlm.actors import serve_app

    registry = registry or default_registry(config.app_name)
    if config.checkpoint is not None:  # the same path (or URI) for the replicas and the registry
        ckpt = config.checkpoint
        config = replace(
            config, checkpoint=ckpt if remote.is_remote(ckpt) else os.path.abspath(ckpt)
        )
    orchestrator = start(config, registry, heldout)
    say(f"kiln: orchestrator for {config.app_name!r}, registry in {registry}")
    address = serve_app.run(config)
    if config.checkpoint is not None:
        version, outcome = adopt(orchestrator, config.checkpoint)
        say(f"kiln: {config.checkpoint} is version {version}: {outcome}")
    return address, orchestrator


def stop(app_name: str) -> None:
    """Remove the application's orchestrator, if it runs: it is detached, so on a joined cluster
    it would outlive ``kiln serve``."""
    import contextlib

    import ray

    from kilnlm.actors.orchestrator import get_orchestrator

    with contextlib.suppress(Exception):  # none by that name, or already gone with Ray
        ray.kill(get_orchestrator(app_name), no_restart=True)


__all__ = [
    "adopt",
    "default_heldout",
    "default_registry",
    "serve_with_orchestrator",
    "start",
    "stop",
]
