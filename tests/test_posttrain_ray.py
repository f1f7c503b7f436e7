"""SFT, the reward model and DPO on real local Ray Train, from a tiny parent model.

The parent is pretrained in-process (a few hundred steps of test-1m on the stdlib corpus). Each
objective then runs through the one worker of ``cluster/worker.py``, on the embedded defaults,
with the fault drill SIGKILLing the last rank two steps after the first checkpoint; the worker
group restarts and resumes from it. Its export and figures are what the quality tests read. Its
losses must agree bit for bit, on every step up to two past the kill, with a reference that
never stopped:

* SFT runs on 2 workers (FSDP2, gloo) and its reference is a second, uninterrupted Ray run;
* the reward model and DPO run on 1 worker (half the cores of a second Ray run, on a 2-core
  machine) and their reference is the library's ``train_step`` on the same plug-in in this
  process, which the worker must reproduce exactly: one step, one loop, no fork.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from kilnlm.checkpoint import read_manifest, verify_manifest
from kilnlm.cluster.config import ClusterConfig
from kilnlm.cluster.launcher import RunResult, launch_posttrain, launch_spec, posttrain_spec
from kilnlm.posttrain.job import DEFAULT_TRAIN, SHARED_TRAIN, PostTrainConfig
from kilnlm.train import TrainConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EVERY, KILL, SEQ = 10, 12, 192
STEPS = {"sft": 20, "reward": 80, "dpo": 40}
LR = {"sft": 1e-3, "reward": 1e-3, "dpo": 5e-4}


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny pretrained export: test-1m on a 600 KB stdlib corpus, 250 steps in-process."""
    from kilnlm.checkpoint import save_pretrained
    from kilnlm.data import CorpusConfig, build_corpus
    from kilnlm.model import ModelConfig, Transformer
    from kilnlm.shards import TokenShards, get_batch
    from kilnlm.tokenizer import Tokenizer
    from kilnlm.train import train

    root = tmp_path_factory.mktemp("parent")
    build_corpus(CorpusConfig(max_bytes=600_000), root / "corpus", 1024, progress=False)
    tok = Tokenizer.load(root / "corpus")
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig.from_preset("test-1m", vocab_size=tok.vocab_size, block_size=SEQ)
    )
    cfg = TrainConfig(
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=20,
        max_steps=250,
        batch_size=8,
        seq_len=128,
        eval_every=0,
    )
    shards = TokenShards(root / "corpus", "train")
    train(model, cfg, lambda i: get_batch(shards, 8, 128, i, 0, 1, 0), progress=False)
    return str(save_pretrained(model, root / "export", tok, version=7, step=250))


def configs(kind: str, parent: str, storage: Path, name: str, workers: int, **cluster: Any):
    cfg = PostTrainConfig(
        objective=kind, parent=parent, out=str(storage / f"{name}-out"), answer_prompts=8
    )
    train = TrainConfig(
        **{
            **SHARED_TRAIN,
            **DEFAULT_TRAIN[kind],
            "objective": kind,
            "seq_len": SEQ,
            "max_steps": STEPS[kind],
            "lr": LR[kind],
            "min_lr": LR[kind] / 10,
            "eval_every": EVERY,
            "checkpoint_every": EVERY,
            "log_every": 1,
        }
    )
    cc = ClusterConfig(
        workers=workers,
        storage_path=str(storage),
        name=name,
        progress=False,
        checkpoint_upload="sync",
        **cluster,
    )
    return cfg, train, cc


@dataclass
class Runs:
    summary: dict[str, Any]
    killed: RunResult
    reference: dict[int, float]
    """Loss per step (1-based) of the uninterrupted reference."""
    spec: Any


def run_both(kind: str, parent: str, storage: Path, workers: int) -> Runs:
    cfg, train, cc = configs(
        kind, parent, storage, f"{kind}-killed", workers, drill_kill_step=KILL, max_failures=1
    )
    summary, killed = launch_posttrain(cfg, train, cc)
    assert summary is not None, killed.error
    cfg, train, cc = configs(
        kind, parent, storage, f"{kind}-ref", workers, stop_at_step=KILL + 2, export=False
    )
    spec, _ = posttrain_spec(cfg, train, cc)
    if workers > 1:
        return Runs(summary, killed, losses(launch_spec(spec)), spec)
    return Runs(summary, killed, in_process_losses(spec, KILL + 2), spec)


def in_process_losses(spec: Any, steps: int) -> dict[int, float]:
    """What the worker computes with one rank, done by the library in this process."""
    from kilnlm.model import Transformer
    from kilnlm.train import build_optimizer, train_step

    torch.manual_seed(spec.train.seed)
    model = Transformer(spec.model)
    spec.posttrain.init_weights(model)
    optimizer = build_optimizer(model, spec.train)
    out = {}
    for step in range(steps):
        batch = spec.posttrain.batch(step, 0, 1)
        m = train_step(model, optimizer, [batch], spec.train, step, objective=spec.posttrain.loss)
        out[step + 1] = m.loss
    return out


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("posttrain-runs")


@pytest.fixture(scope="module")
def sft(ray_cluster, parent: str, storage: Path) -> Runs:
    return run_both("sft", parent, storage, workers=2)


@pytest.fixture(scope="module")
def reward(ray_cluster, parent: str, storage: Path) -> Runs:
    return run_both("reward", parent, storage, workers=1)


@pytest.fixture(scope="module")
def dpo(ray_cluster, parent: str, storage: Path) -> Runs:
    return run_both("dpo", parent, storage, workers=1)


def losses(result: RunResult) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in result.history}


def check_resumed_bit_exactly(runs: Runs) -> None:
    killed, reference = runs.killed, runs.reference
    assert (Path(killed.run_uri) / f"drill-killed-{KILL}").is_file()  # rank 1 really died
    assert killed.worker_result["resumed_from"] == EVERY
    got, want = losses(killed), reference
    assert sorted(want) == list(range(1, KILL + 3))
    assert {s: got[s] for s in want} == want  # bit for bit, before and after the kill


def check_export(runs: Runs, kind: str, parent: str) -> dict[str, Any]:
    fields = verify_manifest(runs.summary["export"]).fields
    assert fields["objective"] == kind and fields["parent_export"] == parent
    assert fields["parent_version"] == 7 and fields["data"] == "embedded stdlib defaults"
    assert fields["step"] == STEPS[kind]
    return fields


# --------------------------------------------------------------------------------------------


def test_sft_resumes_bit_exactly_after_a_worker_kill(sft: Runs, parent: str) -> None:
    check_resumed_bit_exactly(sft)
    check_export(sft, "sft", parent)


def test_sft_workers_train_on_assistant_tokens_only(sft: Runs, parent: str) -> None:
    """Step 1 on the two FSDP2 workers reports the mean over ranks of each rank's loss at the
    parent's weights: it equals the assistant-token loss computed here, not the all-token one."""
    from kilnlm.checkpoint import load
    from kilnlm.train import IGNORE_INDEX, TOKEN_LOSS

    model, plugin = load(parent), sft.spec.posttrain
    masked, unmasked = [], []
    with torch.no_grad():
        for rank in range(2):
            x, y = plugin.batch(0, rank, 2)
            masked.append(TOKEN_LOSS.loss_sum(model, (x, y)) / TOKEN_LOSS.count((x, y)))
            full = torch.where(x[:, 1:] != plugin.pad_id, x[:, 1:], IGNORE_INDEX)
            y_all = torch.cat([full, y[:, -1:]], dim=1)  # every next token, pads excepted
            unmasked.append(TOKEN_LOSS.loss_sum(model, (x, y_all)) / TOKEN_LOSS.count((x, y_all)))
    step1 = sft.reference[1]
    assert step1 == pytest.approx(float(sum(masked) / 2), abs=1e-4)
    assert abs(step1 - float(sum(unmasked) / 2)) > 0.05


def test_sft_lowers_the_heldout_assistant_loss_and_answers_stop(sft: Runs) -> None:
    before, after = sft.summary["figures"]["before"], sft.summary["figures"]["after"]
    assert after["heldout_assistant_loss"] < before["heldout_assistant_loss"] - 0.3
    assert after["stopped_at_eos"] > before["stopped_at_eos"]
    assert after["rouge_l"] > before["rouge_l"]
    assert sft.killed.csv_path.is_file() and sft.killed.png_path.read_bytes()[:4] == b"\x89PNG"


def test_reward_model_resumes_bit_exactly_after_a_worker_kill(reward: Runs, parent: str) -> None:
    check_resumed_bit_exactly(reward)
    fields = check_export(reward, "reward", parent)
    assert fields["reward_head"]["token"] == "<|mask|>"
    assert reward.reference[1] == pytest.approx(0.6931, abs=1e-3)  # zeroed head: log 2


def test_reward_model_beats_chance_on_heldout_pairs(reward: Runs) -> None:
    """Stated margin: held-out pairwise accuracy at least 0.65 (chance 0.5; with ~140 held-out
    pairs one standard error of a coin is 0.042, so 0.65 is more than 3.5 of them)."""
    figures = reward.summary["figures"]["after"]
    assert figures["pairs"] > 100
    assert figures["accuracy"] >= 0.65


def test_reward_score_prints_one_pair_per_line_in_file_order(
    reward: Runs, tmp_path: Path, capsys
) -> None:
    from kilnlm.cli import main

    good, broken = "def f(a, b):\n    return a + b", "def f(a, b)\n    return a + b"
    lines = [
        {"prompt": "Write a Python function that adds.", "chosen": good, "rejected": broken},
        {"prompt": "hi", "chosen": "same", "rejected": "same"},  # kept: scoring skips nothing
        {"prompt": "Write a Python function that adds.", "chosen": good, "rejected": broken},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    export = reward.summary["export"]
    assert main(["reward", "score", "--model", export, "--data", str(data), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and rows[0] == rows[2]
    assert rows[1]["chosen"] == rows[1]["rejected"]
    parent = read_manifest(export).fields["parent_export"]
    assert main(["reward", "score", "--model", parent, "--data", str(data), "--json"]) == 2
    assert "not a reward model" in capsys.readouterr().err


def test_dpo_resumes_bit_exactly_after_a_worker_kill(dpo: Runs, parent: str) -> None:
    check_resumed_bit_exactly(dpo)
    fields = check_export(dpo, "dpo", parent)
    assert fields["beta"] == 0.1
    assert dpo.reference[1] == pytest.approx(0.6931, abs=1e-3)  # policy = reference


def test_dpo_implicit_reward_ranks_heldout_pairs_better_than_the_reference(dpo: Runs) -> None:
    f = dpo.summary["figures"]["after"]
    assert f["implicit_accuracy"] > f["reference_logp_accuracy"] + 0.05
    assert f["implicit_accuracy"] > 0.6 and f["implicit_margin"] > 0
    assert 0 < f["kl_per_prompt"] < 50  # moved away from the reference, but not far
