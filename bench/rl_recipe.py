"""The live ``kiln rl --toy`` recipe, simulated in one process: which sizes reach the 5x tolerance.

Each iteration draws ``samples`` completions from the current policy (as the replicas do after a
hot-swap), then takes ``steps`` optimiser steps on them with the RLOO loss (KL in the reward, the
importance weight capped at 2 for the steps after the first), with the optimiser the Ray Train
worker uses (``build_optimizer``: AdamW, betas 0.9/0.95, no weight decay, gradient clip 1) and the
schedule the long-lived run has (``lr_at``: a cosine from ``lr`` to 0 over iterations x steps).
It prints, per β, KL(π0‖π*), the final KL(πθ‖π*) and their ratio: seconds per configuration,
where the live loop needs minutes, so the sizes of ``kiln rl --toy`` were chosen with it
(docs/rl.md, "Live loop").

    python bench/rl_recipe.py                              # the --toy sizes, seeds 1 3 4
    python bench/rl_recipe.py --iterations 8 --betas 1 --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from kilnlm.rl.objective import RLBatch, RLObjective, rloo_loss
from kilnlm.rl.reward import toy_reward
from kilnlm.rl.rollout import sample_group
from kilnlm.rl.toy import ToyPosterior, allowed_mask
from kilnlm.rl.toy_policy import train_toy_policy
from kilnlm.train import TrainConfig, build_optimizer, clip_gradients, lr_at, set_lr


def run(toy, beta: float, iterations: int, samples: int, steps: int, lr: float, seed: int) -> dict:
    post = ToyPosterior.of(toy.model, toy.spec, toy_reward, toy.decode, beta)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    policy, reference = copy.deepcopy(toy.model).train(), toy.model.eval()
    cfg = TrainConfig(
        objective="rl", lr=lr, min_lr=0.0, warmup_steps=0, max_steps=iterations * steps,
        batch_size=samples, seq_len=16, eval_every=0, weight_decay=0.0,
    )  # fmt: skip
    opt = build_optimizer(policy, cfg)
    mask = allowed_mask(toy.spec.allowed_ids, toy.model.config.vocab_size)
    objective = RLObjective(beta)
    start = post.measure_model(policy).kl_to_target
    kls, step = [], 0
    for it in range(iterations):
        sampler = copy.deepcopy(policy).eval()
        drawn = sample_group(sampler, toy.spec, samples, gen, it, post.reward_of, it)
        batch = RLBatch.from_samples(drawn, pad_id=toy.spec.eos_id)
        for _ in range(steps):
            set_lr(opt, lr_at(step, cfg))
            loss, _ = rloo_loss(policy, reference, batch, objective, mask, it)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(policy, cfg.grad_clip)
            opt.step()
            step += 1
        kls.append(post.measure_model(policy).kl_to_target)
    return {"kl_start": start, "kl_final": kls[-1], "kl_best": min(kls), "ratio": start / kls[-1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--betas", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 3, 4])
    args = p.parse_args()
    torch.set_num_threads(1)
    toy = train_toy_policy()
    for beta in args.betas:
        for seed in args.seeds:
            t = time.perf_counter()
            r = run(toy, beta, args.iterations, args.samples, args.steps, args.lr, seed)
            row = {"beta": beta, "seed": seed, **{k: round(v, 4) for k, v in r.items()}}
            print(json.dumps({**row, "seconds": round(time.perf_counter() - t, 1)}), flush=True)


if __name__ == "__main__":
    main()
