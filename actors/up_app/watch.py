"""What a person watching ``kiln up`` sees while it runs: each promotion with a greedy generation
from the new version (``PromotionWatcher``), and a bounded background load of streaming requests
through the gateway (``ClientLoad``) whose records the summary counts."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kilnlm.actors.up_app.config import LOAD_PROMPTS, LoadConfig, UpConfig


@dataclass
class Promotion:
    """One promotion as the watcher saw it, with the generation it got from the new version."""

    version: int
    seen_unix: float
    text: str = ""
    served_by: int | None = None
    """The version the gateway's answer names (a newer one if it was promoted meanwhile)."""
    error: str = ""


class PromotionWatcher:
    """Polls the orchestrator; after each successful swap, asks the new version (greedy, via
    gRPC) to complete the fixed prompt and prints both. Also unblocks the client load once the
    first version serves on every replica."""

    def __init__(
        self, orchestrator: Any, address: str, config: UpConfig, say: Callable[[str], None]
    ) -> None:
        self.orchestrator, self.address, self.config, self.say = orchestrator, address, config, say
        self.serving = threading.Event()
        """Set once a promotion has completed on every replica (the load waits for it)."""
        self.promotions: list[Promotion] = []
        self.status: Any = None
        self._swaps_seen: set[int] = set()
        self._rejections_seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-up-watcher", daemon=True)

    def start(self) -> PromotionWatcher:
        self._thread.start()
        return self

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        if wait:
            self._thread.join(30)

    def refresh(self) -> Any:
        """The orchestrator's status now (also kept as ``self.status``)."""
        import ray

        self.status = ray.get(self.orchestrator.status.remote(), timeout=30)
        return self.status

    def _run(self) -> None:
        from kilnlm.client import Client

        with Client(self.address, timeout=60) as client:
            while not self._stop.wait(self.config.status_poll_s):
                try:
                    self._check(client, self.refresh())
                except Exception as e:  # a slow or restarting orchestrator: try again next poll
                    self.say(f"[kiln up] status poll failed ({type(e).__name__}: {e}); retrying")

    def _check(self, client: Any, status: Any) -> None:
        for record in status.checkpoints:
            if record.status == "rejected" and record.version not in self._rejections_seen:
                self._rejections_seen.add(record.version)
                self.say(f"── version {record.version} rejected: {record.reason}")
        promoted = []
        for swap in status.swaps:
            if swap.swap_id in self._swaps_seen or swap.outcome == "running":
                continue
            self._swaps_seen.add(swap.swap_id)
            if swap.outcome == "ok" and swap.kind in ("promote", "rollback"):
                promoted.append(swap)
            elif swap.outcome != "ok":
                self.say(f"── swap to version {swap.version} {swap.outcome}: {swap.reason}")
        if promoted:
            self.serving.set()
        for i, swap in enumerate(promoted):  # several at once: only the last one still serves
            self._show(client, status, swap, ask=i == len(promoted) - 1)

    def _show(self, client: Any, status: Any, swap: Any, ask: bool) -> None:
        """Print the promotion and a greedy generation pinned to its version (a newer version
        promoted meanwhile answers FAILED_PRECONDITION: shown as superseded, never mislabelled)."""
        import grpc

        promotion = Promotion(swap.version, time.time())
        try:
            if not ask:
                raise LookupError("superseded before it could be asked")
            out = client.generate(
                self.config.prompt,
                temperature=0,
                max_tokens=self.config.prompt_tokens,
                pin_version=swap.version,
            )
            promotion.text, promotion.served_by = out.text, out.finish.model_version
        except LookupError as e:
            promotion.error = str(e)
        except grpc.RpcError as e:
            superseded = e.code() == grpc.StatusCode.FAILED_PRECONDITION
            promotion.error = "superseded before it answered" if superseded else e.code().name
        self.promotions.append(promotion)
        record = next(r for r in status.checkpoints if r.version == swap.version)
        self.say(promotion_banner(record, swap, promotion, self.config.prompt))


def promotion_banner(record: Any, swap: Any, promotion: Promotion, prompt: str) -> str:
    """The lines printed after a promotion: what was promoted, how good, how fast, and its text."""
    v = record.validation
    quality = (
        "" if v is None else f"held-out ppl {v.perplexity:.2f} ({v.bits_per_byte:.3f} bits/byte), "
    )
    step = "" if record.step is None else f" (step {record.step})"
    head = (
        f"── version {record.version}{step} {swap.kind}d: {quality}swap {swap.seconds:.2f} s, "
        f"registered → serving {swap.registered_to_serving_s:.1f} s"
    )
    if promotion.error:
        return f"{head}\n   (no generation: {promotion.error})"
    text = (prompt + promotion.text).rstrip()
    body = "\n".join("   │ " + line for line in text.split("\n"))
    return f"{head}\n   greedy, from version {promotion.served_by}:\n{body}"


# --------------------------------------------------------------------------------------------
# Background client load


@dataclass
class RequestRecord:
    """One streaming request of the background load."""

    start_unix: float
    end_unix: float = 0.0
    version: int | None = None
    tokens: int = 0
    error: str = ""
    """gRPC status name when it failed ("" when served)."""


class ClientLoad:
    """``clients`` threads, each streaming sampled generations back to back through the gateway
    once the first version serves, until stopped. Bounded: one request in flight per client."""

    def __init__(self, address: str, config: LoadConfig, serving: threading.Event) -> None:
        self.address, self.config, self.serving = address, config, serving
        self.requests: list[RequestRecord] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), name=f"kiln-up-load-{i}", daemon=True)
            for i in range(config.clients)
        ]

    def start(self) -> ClientLoad:
        for t in self._threads:
            t.start()
        return self

    def stop(self, wait: bool = True) -> None:
        """Stop sending; with ``wait``, let requests in flight finish (they are counted)."""
        self._stop.set()
        for t in self._threads if wait else ():
            t.join(self.config.timeout_s + 5)

    def _client(self, index: int) -> None:
        from kilnlm.client import Client

        while not self.serving.wait(0.5):
            if self._stop.is_set():
                return
        with Client(self.address, timeout=self.config.timeout_s) as client:
            n = 0
            while not self._stop.is_set():
                prompt = LOAD_PROMPTS[(index + n) % len(LOAD_PROMPTS)]
                self.requests.append(self._one(client, prompt, seed=index * 100_000 + n))
                n += 1
                self._stop.wait(self.config.pause_s)

    def _one(self, client: Any, prompt: str, seed: int) -> RequestRecord:
        import grpc

        record = RequestRecord(start_unix=time.time())
        c = self.config
        try:
            for delta in client.generate_stream(
                prompt, temperature=c.temperature, top_p=c.top_p, max_tokens=c.max_tokens, seed=seed
            ):
                record.tokens += len(delta.token_ids)
                if delta.finish is not None:
                    record.version = delta.finish.model_version
            if record.version is None:
                record.error = "NO_FINISH"
        except grpc.RpcError as e:
            record.error = e.code().name
        record.end_unix = time.time()
        return record
