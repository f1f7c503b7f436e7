"""Clients keep being served during ``kiln rl``: a whole ``run_live`` (real Ray Serve replicas
and gRPC gateway, the real orchestrator, a real Ray Train update, one hot-swap) with a
background client streaming through the gateway from start to end.

The run also takes the two other inputs ``kiln rl`` accepts besides the toy's: a chat prompt
beside a plain one, and a reward-model export as the reward (made from the toy's π0 as
``kiln reward train`` makes one: the manifest's ``reward_head`` names the ``<|mask|>`` row), whose
values in the run's summary must equal what ``kiln reward score`` prints.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def kiln_reward_score(model_dir, rows, tmp_path) -> list[float]:
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": p, "chosen": c, "rejected": "zz"}) + "\n" for p, c in rows)
    )
    code = "import sys; from kilnlm.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "reward", "score", "--model", str(model_dir)]
    cmd += ["--data", str(data), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    return [row["chosen"] for row in json.loads(out)]


def test_clients_are_served_through_the_run_by_promoted_versions_only(ray_cluster, tmp_path):
    from kilnlm.checkpoint import load, load_tokenizer, save_pretrained
    from kilnlm.cluster.rl import RLLoopConfig
    from kilnlm.cluster.rl_run import run_live
    from kilnlm.posttrain.reward import reward_head_field
    from kilnlm.rl.prompts import RLPrompt
    from kilnlm.rl.toy_policy import PROMPT, export_toy_policy, toy_words, train_toy_policy

    toy = train_toy_policy()
    pi0 = str(export_toy_policy(toy, tmp_path / "pi0"))
    tok = load_tokenizer(pi0)
    head = reward_head_field(tok.special_id("<|mask|>"))
    rm = save_pretrained(load(pi0), tmp_path / "rm", tokenizer=tok, reward_head=head)
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n".join(PROMPT + w for w in toy_words(400, 1)))
    chat = RLPrompt.chat([{"role": "user", "content": PROMPT}])
    cfg = RLLoopConfig(
        policy=pi0, reward=str(rm), prompts=(PROMPT, chat), beta=1.0, out=str(tmp_path / "out"),
        samples=4, iterations=1, max_tokens=toy.spec.max_len,
        allowed_token_ids=toy.spec.allowed_ids,
    )  # fmt: skip
    summary = run_live(cfg, str(heldout), app="kiln-test-rl-clients", say=lambda _: None)

    clients = summary["clients"]
    promoted = clients["promoted"]
    assert len(promoted) == 2 and summary["iterations"][0]["new_version"] == promoted[-1]
    assert clients["failed"] == 0 and clients["errors"] == []
    assert clients["requests"] == sum(clients["versions"].values()) > 0
    assert set(clients["versions"]) <= set(promoted) and clients["unpromoted_versions_seen"] == []
    assert promoted[-1] in clients["versions"]  # served by the new policy after the swap

    gens = summary["generations"]
    assert [g["version"] for g in gens["before"]] == [promoted[0]] * 2
    assert [g["version"] for g in gens["after"]] == [promoted[-1]] * 2
    assert summary["after"]["version"] == promoted[-1] and summary["after"]["samples"] == 8
    # the reward model's values in the run (a Ray task) are kiln reward score's: a plain prompt
    # is read as one user turn, so both prompts are the conversation [user "w:"]
    rows = [(PROMPT, g["completion"]) for g in gens["before"] + gens["after"]]
    expected = kiln_reward_score(rm, rows, tmp_path)
    got = [g["reward"] for g in gens["before"] + gens["after"]]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)
