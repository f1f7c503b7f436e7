"""Shared by the serving tests: a tiny real checkpoint, and a gateway run in a background loop.

Not a test module (no ``test_`` prefix); the serving test modules import it (pytest puts tests/
on sys.path).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import torch

from kilnlm.checkpoint import save_pretrained
from kilnlm.model import ModelConfig, Transformer
from kilnlm.tokenizer import Tokenizer

T = TypeVar("T")

TEXT = (
    "The kiln fires clay into stone. A potter shapes the clay on a wheel, lets it dry, and "
    "loads the kiln with bowls, cups and plates. Heat rises slowly; the glaze melts and flows. "
    "Después, la cerámica se enfría — 陶器 🏺 — and the potter opens the kiln to see the work. "
)


def make_checkpoint(path: Path, version: int = 1, seed: int = 0, block_size: int = 256) -> Path:
    """A random test-1m-shaped model (context ``block_size``) with a BPE tokenizer, exported.

    The EOS row of the output projection is zeroed: its logit is then 0 while the largest of
    ~300 random logits is well above 0, so greedy decoding never stops early and a test can
    ask for long generations (cancellation, deadlines) and get exactly max_tokens.
    """
    tokenizer = Tokenizer.train([TEXT * 8], vocab_size=320, min_frequency=2)
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("test-1m", vocab_size=tokenizer.vocab_size, block_size=block_size)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_id].zero_()
    return save_pretrained(model, path, tokenizer=tokenizer, version=version)


class LoopThread:
    """An asyncio loop in a daemon thread: servers run there while tests call blocking clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, period: float = 0.02) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass; returns its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(period)
    return predicate()


def replica_pids(app: str) -> list[int]:
    """The LLMServer replica processes of Serve application ``app``, found by the title Ray
    gives an actor's worker process (no Ray API needed: the dashboard may be off)."""
    import os

    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if f"ServeReplica:{app}:LLMServer" in title:
            pids.append(int(entry))
    return pids
