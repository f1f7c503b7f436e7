"""kilnlm.cluster pieces that need no Ray: sharded checkpoints, checksums, export, metrics, configs.

The checkpoint tests save real torch.distributed.checkpoint folders from one process (DCP needs no
process group for that), so they run in a second; the multi-rank path is covered in test_cluster.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from kilnlm.checkpoint import (
    ChecksumError,
    IncompleteCheckpointError,
    load,
    verify_manifest,
)
from kilnlm.cluster.checkpointing import (
    CheckpointError,
    Exporter,
    TrainState,
    capture_rng,
    checkpoint_dir_name,
    export_checkpoint,
    find_resume_checkpoint,
    load_sharded,
    restore_rng,
    save_sharded,
    verify_checkpoint,
)
from kilnlm.cluster.config import ClusterConfig, JobConfig, load_job, resolve_grad_accum
from kilnlm.cluster.metrics import History, cuda_peak_tflops, mfu, write_csv
from kilnlm.model import ModelConfig, Transformer
from kilnlm.train import TrainConfig, build_optimizer, train_step

CFG = ModelConfig.from_preset("test-1m", vocab_size=128, block_size=32)
# One process saving a DCP checkpoint is what these tests do on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

TRAIN = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_steps=1, max_steps=6, batch_size=2, seq_len=16)


def batch(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    data = torch.randint(0, CFG.vocab_size, (TRAIN.batch_size, TRAIN.seq_len + 1), generator=g)
    return [(data[:, :-1], data[:, 1:])]


def fresh(seed: int = 0) -> tuple[Transformer, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Transformer(CFG)
    return model, build_optimizer(model, TRAIN)


def state_at(step: int, world_size: int = 1) -> TrainState:
    cpu, _ = capture_rng(torch.device("cpu"))
    return TrainState(step, step * 32, step, world_size, 1, 0, 0, heldout_loss=1.5, cpu_rng=cpu)


def run_steps(model: Transformer, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    return [train_step(model, opt, batch(s), TRAIN, s).loss for s in steps]


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, list[float]]:
    """A run dir with checkpoints after steps 2 and 4, and the losses of 6 uninterrupted steps."""
    model, opt = fresh()
    losses = run_steps(model, opt, range(2))
    save_sharded(tmp_path / checkpoint_dir_name(2, 0), model, opt, state_at(2), 0, CFG)
    losses += run_steps(model, opt, range(2, 4))
    save_sharded(tmp_path / checkpoint_dir_name(4, 0), model, opt, state_at(4), 0, CFG)
    losses += run_steps(model, opt, range(4, 6))
    return tmp_path, losses


def test_resume_from_a_sharded_checkpoint_is_bit_exact(saved: tuple[Path, list[float]]) -> None:
    run_dir, losses = saved
    model, opt = fresh(seed=123)  # different init: everything must come from the checkpoint
    state = load_sharded(run_dir / checkpoint_dir_name(4, 0), model, opt, rank=0)
    assert state.step == 4 and state.heldout_loss == 1.5
    assert run_steps(model, opt, range(4, 6)) == losses[4:]


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.load as it is, except that reaching ``weights_only=False`` fails the test."""
    real_load = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("weights_only") is False:
            raise AssertionError("torch.load(weights_only=False) reached: something was unpickled")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)


def test_optimizer_state_is_restored_bit_exactly_without_unpickling(
    tmp_path: Path, no_unpickling: None
) -> None:
    model, opt = fresh()
    run_steps(model, opt, range(3))
    save_sharded(tmp_path / "ckpt", model, opt, state_at(3), 0, CFG)
    assert "optimizer_settings.json" in rank_manifest_files(tmp_path / "ckpt")
    torch.manual_seed(7)
    other = Transformer(CFG)  # other weights and other optimizer settings, all to be replaced
    other_opt = build_optimizer(
        other,
        TrainConfig(
            lr=5e-2, betas=(0.5, 0.6), eps=1e-3, weight_decay=0.3, warmup_steps=1, max_steps=9
        ),
    )
    load_sharded(tmp_path / "ckpt", other, other_opt, rank=0)
    saved, restored = opt.state_dict(), other_opt.state_dict()
    assert restored["param_groups"] == saved["param_groups"]
    assert all(type(g["betas"]) is tuple for g in restored["param_groups"])
    assert restored["state"].keys() == saved["state"].keys()
    for key, moments in saved["state"].items():
        for name, value in moments.items():
            assert torch.equal(restored["state"][key][name], value), (key, name)
    assert run_steps(other, other_opt, range(3, 5)) == run_steps(model, opt, range(3, 5))


def test_the_unpickling_guard_catches_dcp_loading_pickled_values(
    tmp_path: Path, no_unpickling: None
) -> None:
    """The guard is real: DCP itself reaches weights_only=False for a non-tensor value."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    dcp.save({"groups": [{"lr": 0.1}]}, checkpoint_id=str(tmp_path / "pickled"))
    with pytest.raises(CheckpointException) as info:  # DCP wraps what a rank raised
        dcp.load({"groups": [{"lr": 0.0}]}, checkpoint_id=str(tmp_path / "pickled"))
    assert "weights_only=False) reached" in str(info.value.failures[0][0])


def rank_manifest_files(path: Path) -> set[str]:
    return set(json.loads((path / "manifest-rank00000.json").read_text())["files"])


def test_rng_state_round_trips() -> None:
    cpu, _ = capture_rng(torch.device("cpu"))
    expected = torch.rand(3)
    torch.rand(5)
    restore_rng(TrainState(0, 0, 0, 1, 1, 0, 0, cpu_rng=cpu), torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_shard_is_detected_and_named(saved: tuple[Path, list[float]]) -> None:
    ckpt = saved[0] / checkpoint_dir_name(4, 0)
    assert verify_checkpoint(ckpt).step == 4
    flip_byte(ckpt / "__0_0.distcp")
    with pytest.raises(ChecksumError, match=r"__0_0.distcp") as info:
        verify_checkpoint(ckpt)
    assert info.value.file == "__0_0.distcp"


def test_truncated_and_half_written_checkpoints_are_refused(
    saved: tuple[Path, list[float]],
) -> None:
    ckpt = saved[0] / checkpoint_dir_name(4, 0)
    metadata = ckpt / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:-10])
    with pytest.raises(ChecksumError, match=r"\.metadata"):
        verify_checkpoint(ckpt)
    (ckpt / "manifest-rank00000.json").unlink()  # the manifest is written last: save never finished
    with pytest.raises(IncompleteCheckpointError, match=r"manifest-rank00000\.json"):
        verify_checkpoint(ckpt)


def test_a_rank_manifest_that_is_a_json_list_is_refused_cleanly(tmp_path: Path) -> None:
    model, opt = fresh()
    save_sharded(tmp_path / "ckpt", model, opt, state_at(1), 0, CFG)
    (tmp_path / "ckpt" / "manifest-rank00000.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"JSON list.*resume from an earlier checkpoint"):
        verify_checkpoint(tmp_path / "ckpt")


def test_a_rank_whose_part_never_arrived_is_named(tmp_path: Path) -> None:
    model, opt = fresh()
    save_sharded(tmp_path / "ckpt", model, opt, state_at(1, world_size=2), 0, CFG)  # rank 1 absent
    with pytest.raises(IncompleteCheckpointError, match=r"manifest-rank00001\.json"):
        verify_checkpoint(tmp_path / "ckpt")


def test_resume_skips_a_corrupted_latest_checkpoint(saved: tuple[Path, list[float]]) -> None:
    run_dir, _ = saved
    latest = run_dir / checkpoint_dir_name(4, 0)
    flip_byte(latest / "train_state-rank00000.json")
    point = find_resume_checkpoint(latest)
    assert point.path.name == checkpoint_dir_name(2, 0) and point.state.step == 2
    assert len(point.skipped) == 1 and "train_state-rank00000.json" in point.skipped[0]
    flip_byte(run_dir / checkpoint_dir_name(2, 0) / "__0_0.distcp")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        find_resume_checkpoint(latest)


def test_export_of_a_sharded_checkpoint_matches_the_model(
    saved: tuple[Path, list[float]], tmp_path: Path
) -> None:
    run_dir, _ = saved
    model, opt = fresh(seed=7)
    load_sharded(run_dir / checkpoint_dir_name(4, 0), model, opt, rank=0)
    out = export_checkpoint(run_dir / checkpoint_dir_name(4, 0), tmp_path / "export")
    manifest = verify_manifest(out)
    assert manifest.fields["step"] == 4 and manifest.fields["version"] == 4
    assert manifest.fields["heldout_loss"] == 1.5
    x = torch.randint(0, CFG.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(load(out)(x), model.eval()(x))


def test_a_corrupted_checkpoint_is_never_exported(
    saved: tuple[Path, list[float]], tmp_path: Path
) -> None:
    ckpt = saved[0] / checkpoint_dir_name(4, 0)
    flip_byte(ckpt / "__0_0.distcp")
    with pytest.raises(ChecksumError, match=r"__0_0.distcp"):
        export_checkpoint(ckpt, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_exporter_writes_in_the_background_and_calls_the_hook_in_order(tmp_path: Path) -> None:
    model, _ = fresh()
    calls: list[str] = []
    exporter = Exporter(str(tmp_path / "exports"), CFG, hook=calls.append)
    for step in (5, 10):
        exporter.submit(model.state_dict(), step, tokens_seen=step * 64, heldout_loss=2.0)
    exporter.close()
    assert calls == exporter.exported and len(calls) == 2
    for uri, step in zip(calls, (5, 10), strict=True):  # named by step and content
        assert Path(uri).parent == tmp_path / "exports"
        assert re.fullmatch(rf"step-{step:08d}-[0-9a-f]{{12}}", Path(uri).name)
    fields = verify_manifest(calls[1]).fields
    assert fields == {"version": 10, "step": 10, "tokens_seen": 640, "heldout_loss": 2.0}


def test_a_failing_hook_is_recorded_not_fatal(tmp_path: Path) -> None:
    def broken(uri: str) -> None:
        raise RuntimeError("registry down")

    exporter = Exporter(str(tmp_path), CFG, hook=broken)
    exporter.submit(fresh()[0].state_dict(), 1)
    exporter.close()
    assert len(exporter.exported) == 1 and "registry down" in exporter.hook_errors[0]


# --------------------------------------------------------------------------------------------
# Metrics


def test_history_keeps_each_step_once_after_a_rewind(tmp_path: Path) -> None:
    history = History()
    for step, loss in [(1, 5.0), (2, 4.0), (3, 3.9), (2, 4.0), (3, 3.0), (4, 2.5)]:
        history.add({"step": step, "loss": loss})
    assert history.steps == [1, 2, 3, 4]
    assert history.column("loss") == [5.0, 4.0, 3.0, 2.5]  # the surviving attempt's values
    assert history.rewinds == [2]
    path = write_csv(
        [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0, "heldout_loss": 4.5}],
        tmp_path / "m.csv",
    )
    assert path.read_text().splitlines() == ["step,loss,heldout_loss", "1,5.0,", "2,4.0,4.5"]


def test_mfu_worked_example_and_peak_table() -> None:
    # 6·1e9 FLOPs/token at 1e5 tokens/s on one 989-TFLOPS H100 = 0.0607% ... of peak
    assert mfu(6e9, 1e5, 989.0) == pytest.approx(6e14 / 989e12)
    assert mfu(6e9, 1e5, None) is None
    assert cuda_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert cuda_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert cuda_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert cuda_peak_tflops("Some Future GPU", "bf16") is None


# --------------------------------------------------------------------------------------------
# Configs


def test_global_batch_in_tokens_sets_grad_accumulation() -> None:
    train = TrainConfig(batch_size=4, seq_len=128)
    cc = ClusterConfig(workers=2, global_batch_tokens=4096)
    assert resolve_grad_accum(train, cc, 2).grad_accum_steps == 4  # 4096 / (2·4·128)
    with pytest.raises(ValueError, match=r"global_batch_tokens.*1024"):
        resolve_grad_accum(train, ClusterConfig(workers=2, global_batch_tokens=1500), 2)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"workers": 0}, "workers"),
        ({"cpus_per_worker": 0}, "cpus_per_worker"),
        ({"checkpoint_upload": "later"}, "checkpoint_upload"),
        ({"global_batch_tokens": 0}, "global_batch_tokens"),
        ({"workers": 2, "drill_kill_rank": 2}, "drill_kill_rank"),
        ({"name": "a/b"}, "name"),
    ],
)
def test_cluster_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"ClusterConfig.{field}"):
        ClusterConfig(**kwargs)


def test_job_file_tables_override_the_job_defaults_and_flags_override_the_file(
    tmp_path: Path,
) -> None:
    from kilnlm.cli import build_parser
    from kilnlm.cli.training import job_from_args

    path = tmp_path / "job.toml"
    path.write_text(
        'preset = "test-1m"\n[train]\nlr = 0.01\n[cluster]\nworkers = 3\n[model]\nn_layer = 3\n'
    )
    job = load_job(path)
    assert job.train.lr == 0.01 and job.train.max_steps == JobConfig().train.max_steps
    assert job.cluster.workers == 3 and job.model == {"n_layer": 3}
    args = build_parser().parse_args(
        [
            "train",
            "--config",
            str(path),
            "--workers",
            "2",
            "--max-steps",
            "70",
            "--objective",
            "mlm",
            "--n-embd",
            "64",
        ]
    )
    assert isinstance(args, argparse.Namespace)
    job = job_from_args(args)
    assert (job.cluster.workers, job.train.max_steps, job.train.lr) == (2, 70, 0.01)
    model = job.model_config(vocab_size=300)
    assert (model.n_layer, model.n_embd, model.vocab_size, model.causal) == (3, 64, 300, False)
    path.write_text("[train]\nlearning_rate = 1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_job(path)


@pytest.mark.parametrize("command", ["train", "up"])
def test_memory_lever_flags_reach_the_job(command: str) -> None:
    """kiln train and kiln up take the levers as flags through the one job_from_args."""
    from kilnlm.cli import build_parser, training, up

    job_from_args = up.job_from_args if command == "up" else training.job_from_args
    assert job_from_args(build_parser().parse_args([command])).train.meta_init  # on by default
    levers = [
        "--no-meta-init",
        "--precision",
        "bf16",
        "--reduce-dtype",
        "bf16",
        "--activation-checkpointing",
        "--compile",
        "--cpu-offload",
    ]
    train = job_from_args(build_parser().parse_args([command, *levers])).train
    assert (train.meta_init, train.precision, train.reduce_dtype) == (False, "bf16", "bf16")
    assert train.activation_checkpointing and train.compile and train.cpu_offload
    with pytest.raises(ValueError, match="reduce_dtype"):
        TrainConfig(reduce_dtype="fp16")  # type: ignore[arg-type]


def test_the_model_context_is_the_trained_sequence_length_unless_set() -> None:
    """A preset's longer block_size would let the gate and the server use untrained positions."""
    job = JobConfig(preset="tiny-3m", train=TrainConfig(seq_len=96, warmup_steps=1, max_steps=2))
    assert ModelConfig.from_preset("tiny-3m").block_size != 96
    assert job.model_config(vocab_size=300).block_size == 96
    explicit = JobConfig(
        preset="tiny-3m",
        model={"block_size": 512},
        train=TrainConfig(seq_len=96, warmup_steps=1, max_steps=2),
    )
    assert explicit.model_config(vocab_size=300).block_size == 512


def test_copying_a_checkpoint_folder_keeps_it_valid(
    saved: tuple[Path, list[float]], tmp_path: Path
) -> None:
    """What Ray's upload does (a copy into storage) must not break verification."""
    copy = tmp_path / "copy"
    shutil.copytree(saved[0] / checkpoint_dir_name(2, 0), copy)
    assert verify_checkpoint(copy).step == 2
    manifest = json.loads((copy / "manifest-rank00000.json").read_text())
    assert set(manifest["files"]) == {
        ".metadata",
        "__0_0.distcp",
        "model_config.json",
        "optimizer_settings.json",
        "train_state-rank00000.json",
    }


def test_resume_takes_a_checkpoint_ray_never_tracked(saved: tuple[Path, list[float]]) -> None:
    """A worker group can die after writing a checkpoint but before Ray Train collects its
    report: Ray then offers the older one (or none). The newest intact one is taken."""
    from kilnlm.cluster.checkpointing import choose_resume

    run_dir, _ = saved
    older, newest = run_dir / checkpoint_dir_name(2, 0), run_dir / checkpoint_dir_name(4, 0)
    for tracked in (None, older, newest):
        point = choose_resume(tracked, run_dir)
        assert point is not None and point.path == newest and point.state.step == 4
    assert choose_resume(None, run_dir / "fresh-run") is None
