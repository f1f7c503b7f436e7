"""Meta-device init and the memory levers on CPU: two real processes under torch.distributed
with gloo, no Ray (that the flags reach Ray Train's workers is checked in test_cluster.py).

* meta init gives every rank exactly its slice of the weights a whole, unsharded build draws
  from the same seed (the reference: ``Transformer.reset_parameters(generator)``), and the
  buffers ``to_empty`` left as garbage are recomputed;
* each lever trains to the eager run's losses: bit for bit in fp32 (they change where tensors
  live and what is recomputed, not the arithmetic), within 0.05 nats in bf16;
* peak RSS while building a ~100M model on 2 ranks: meta init needs about half of eager's.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kilnlm.model import ModelConfig, Transformer
from kilnlm.train import TrainConfig, build_optimizer, train_step

WORLD = 2
ROPE = ModelConfig.from_preset("test-1m", vocab_size=256, block_size=32)
# The other branches of the model: sinusoidal table (a buffer), tied embedding, biases, LayerNorm.
CLASSIC = ModelConfig(
    vocab_size=250,  # not a multiple of the world size: FSDP pads the last shard
    block_size=32,
    n_layer=2,
    n_head=4,
    n_embd=64,
    norm="layernorm",
    mlp="gelu",
    pos_emb="sinusoidal",
    tie_embeddings=True,
    bias=True,
)
STEPS = 6
TRAIN = dict(lr=3e-3, min_lr=3e-4, warmup_steps=1, max_steps=STEPS, batch_size=2, seq_len=32)


def spawn(fn: Callable[..., Any], tmp_path: Path, *args: Any) -> list[Any]:
    """Run ``fn(rank, *args)`` on WORLD processes joined by a gloo group; each rank's result."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(port, fn, args, str(tmp_path)), nprocs=WORLD)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _entry(rank: int, port: int, fn: Callable[..., Any], args: tuple, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = fn(rank, *args)
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def _build(cfg: ModelConfig, **train: Any) -> Transformer:
    from kilnlm.cluster.parallelize import build_model

    return build_model(cfg, TrainConfig(**{**TRAIN, **train}), torch.device("cpu"), WORLD)


# --------------------------------------------------------------------------------------------
# Meta init = eager init


def _compare_inits(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, cfg in (("rope", ROPE), ("classic", CLASSIC)):
        meta, eager = _build(cfg, seed=7), _build(cfg, seed=7, meta_init=False)
        reference = Transformer(cfg, init_weights=False)  # whole, unsharded, one process
        reference.reset_parameters(torch.Generator().manual_seed(7))
        params = dict(reference.named_parameters())
        out[label] = {
            "any_meta": any(p.is_meta for p in meta.parameters()),
            "same_shards": all(
                torch.equal(p.to_local(), q.to_local())
                for p, q in zip(meta.parameters(), eager.parameters(), strict=True)
            ),
            "same_as_whole": [
                name
                for name, p in meta.named_parameters()
                if torch.equal(p.full_tensor(), params[name])
            ],
            "names": sorted(params),
            "buffers": all(
                torch.equal(b, dict(reference.named_buffers())[n]) for n, b in meta.named_buffers()
            ),
            "n_buffers": len(list(meta.named_buffers())),
            "local_share": sum(p.to_local().numel() for p in meta.parameters())
            / sum(p.numel() for p in meta.parameters()),
        }
        # Last: after a forward the last block keeps its parameters gathered (not DTensors).
        x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = [m(x) for m in (meta, eager, reference)]
        out[label]["logits_meta_eager"] = torch.equal(logits[0], logits[1])
        out[label]["logits_vs_whole"] = (logits[0] - logits[2]).abs().max().item()
    return out


def _inits_and_losses(rank: int) -> dict[str, Any]:
    """One process group for both checks: starting processes is most of their cost."""
    return {"inits": _compare_inits(rank), "losses": _train(rank, LEVERS)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn(_inits_and_losses, tmp_path_factory.mktemp("levers"))


@pytest.fixture(scope="module")
def lever_losses(ranks: list[dict[str, Any]]) -> dict[str, list[float]]:
    return ranks[0]["losses"]  # rank 0's own batch; the gradients were averaged over both


def test_meta_init_gives_each_rank_its_slice_of_the_eager_weights(ranks: list[dict]) -> None:
    for rank, result in enumerate(r["inits"] for r in ranks):
        for label, r in result.items():
            where = f"rank {rank}, {label}"
            assert not r["any_meta"], where
            assert r["same_shards"], where
            assert sorted(r["same_as_whole"]) == r["names"], where  # every parameter, exactly
            assert r["n_buffers"] == 1 and r["buffers"], where  # inv_freq / pos_table recomputed
            assert r["logits_meta_eager"], where
            assert r["logits_vs_whole"] < 1e-5, where
            assert 0.4 < r["local_share"] < 0.6, where  # about 1/WORLD lives on each rank


# --------------------------------------------------------------------------------------------
# Each lever trains to the same losses

LEVERS: dict[str, dict[str, Any]] = {
    "eager": {"meta_init": False},
    "meta": {},
    "activation_checkpointing": {"activation_checkpointing": True},
    "cpu_offload": {"cpu_offload": True},
    "all_fp32": {"activation_checkpointing": True, "cpu_offload": True},
    "bf16": {"precision": "bf16"},
    "bf16_reduce_bf16": {"precision": "bf16", "reduce_dtype": "bf16"},
}


def batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One batch per rank, every step: memorising it, the loss falls by nats in a few steps."""
    g = torch.Generator().manual_seed(rank)
    data = torch.randint(
        0, ROPE.vocab_size, (TRAIN["batch_size"], TRAIN["seq_len"] + 1), generator=g
    )
    return [(data[:, :-1], data[:, 1:])]


def _train(rank: int, levers: dict[str, dict[str, Any]]) -> dict[str, list[float]]:
    losses = {}
    for name, train in levers.items():
        model = _build(ROPE, **train)
        cfg = TrainConfig(**{**TRAIN, **train})
        optimizer = build_optimizer(model, cfg)
        losses[name] = [
            train_step(model, optimizer, batches(rank), cfg, s).loss for s in range(STEPS)
        ]
    return losses


def test_the_eager_run_learns(lever_losses: dict[str, list[float]]) -> None:
    eager = lever_losses["eager"]
    assert eager[-1] < eager[0] - 1.0, eager


@pytest.mark.parametrize("lever", ["meta", "activation_checkpointing", "cpu_offload", "all_fp32"])
def test_fp32_levers_give_the_eager_losses_exactly(
    lever_losses: dict[str, list[float]], lever: str
) -> None:
    assert lever_losses[lever] == pytest.approx(lever_losses["eager"], abs=1e-6)


@pytest.mark.parametrize("lever", ["bf16", "bf16_reduce_bf16"])
def test_bf16_mixed_precision_trains_to_the_same_loss(
    lever_losses: dict[str, list[float]], lever: str
) -> None:
    """bf16 parameters (8 mantissa bits) move each loss by far less than training does."""
    assert lever_losses[lever] == pytest.approx(lever_losses["eager"], abs=0.05)
    assert lever_losses[lever] != lever_losses["eager"]  # the policy really computed in bf16


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_losses(tmp_path: Path) -> None:
    """torch.compile per block (inductor's C++ backend on CPU: about a minute of compiling)."""
    levers = {
        "meta": {},
        "compile": {"compile": True},
        "compile_checkpointed": {"compile": True, "activation_checkpointing": True},
    }
    losses = spawn(_train, tmp_path, levers)[0]
    # Fused kernels may round differently in the last bits, nothing more.
    assert losses["compile"] == pytest.approx(losses["meta"], abs=1e-4)
    assert losses["compile_checkpointed"] == pytest.approx(losses["meta"], abs=1e-4)


def test_one_rank_levers_need_no_process_group() -> None:
    """With one worker nothing is sharded: the levers apply to the plain module."""
    from kilnlm.cluster.parallelize import build_model, is_sharded

    runs = {}
    for name, train in {"plain": {}, "checkpointed": {"activation_checkpointing": True}}.items():
        cfg = TrainConfig(**{**TRAIN, **train})
        model = build_model(ROPE, cfg, torch.device("cpu"), 1)
        assert not is_sharded(model)
        optimizer = build_optimizer(model, cfg)
        runs[name] = [train_step(model, optimizer, batches(0), cfg, s).loss for s in range(3)]
    assert runs["checkpointed"] == runs["plain"]


# --------------------------------------------------------------------------------------------
# Peak memory while building


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _build_peak(rank: int, meta_init: bool) -> dict[str, float]:
    """Peak RSS (bytes) this rank added while building and sharding base-100m."""
    cfg = ModelConfig.from_preset("base-100m")
    _build(ROPE, meta_init=meta_init)  # imports and first-use allocations are not the model's
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak) to the current RSS
    model = _build(cfg, meta_init=meta_init)
    peak = _status_kb("VmHWM")
    biggest = max(p.numel() for p in model.parameters()) * 4
    return {
        "peak": (peak - before) * 1024.0,
        "biggest_param": biggest,
        "param_bytes": 4.0 * sum(p.numel() for p in model.parameters()),
    }


@pytest.mark.slow
def test_meta_init_builds_a_100m_model_in_about_half_the_memory(tmp_path: Path) -> None:
    eager = spawn(_build_peak, tmp_path / "eager", False)
    meta = spawn(_build_peak, tmp_path / "meta", True)
    param_bytes, biggest = eager[0]["param_bytes"], eager[0]["biggest_param"]
    for rank in range(WORLD):
        ratio = meta[rank]["peak"] / eager[rank]["peak"]
        print(
            f"rank {rank}: eager {eager[rank]['peak'] / 2**20:.0f} MiB, meta "
            f"{meta[rank]['peak'] / 2**20:.0f} MiB ({ratio:.2f}); parameters "
            f"{param_bytes / 2**20:.0f} MiB, largest {biggest / 2**20:.0f} MiB"
        )
        assert eager[rank]["peak"] > 0.95 * param_bytes  # every rank held the whole model
        # Its half of the shards plus the one full parameter being drawn, and allocator slack.
        assert meta[rank]["peak"] < param_bytes / WORLD + biggest + 0.1 * param_bytes
        assert ratio < 0.75
