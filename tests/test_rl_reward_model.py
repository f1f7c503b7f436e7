"""``kiln rl --reward RM_EXPORT``: the reward computed in the RL loop's Ray task equals the value
``kiln reward score`` prints for the same (prompt, completion), for chat and plain prompts.

The reward model is made as ``kiln reward train`` makes one (an ordinary export whose manifest's
``reward_head`` names the output row read as the scalar) from a random model, so the rewards
differ reply to reply. ``kiln reward score`` runs as its own process, as a user runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from serving_utils import make_checkpoint

from kilnlm.checkpoint import load, load_tokenizer, save_pretrained
from kilnlm.posttrain.reward import reward_head_field
from kilnlm.rl.prompts import RLPrompt, prompt_ids

PROMPTS = [
    RLPrompt(text="What does os.path.join do?"),
    RLPrompt.chat(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Which module provides deque?"},
        ]
    ),
    RLPrompt.chat([{"role": "user", "content": "Write a function that adds."}]),
]
REPLIES = ["Join paths.", "collections", "def add(a, b):\n    return a + b"]


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    plain = make_checkpoint(root / "plain", seed=3)
    tok = load_tokenizer(plain)
    head = tok.special_id("<|mask|>")
    return save_pretrained(
        load(plain), root / "rm", tokenizer=tok, version=2, reward_head=reward_head_field(head)
    )


def kiln_reward_score(model_dir, tmp_path) -> list[float]:
    """``kiln reward score --json`` on one preference line per (prompt, reply): the chosen
    reply is the one scored; the rejected one is any other text."""
    data = tmp_path / "pairs.jsonl"
    lines = [
        {"prompt": p.text if p.messages is None else list(p.messages), "chosen": r, "rejected": "x"}
        for p, r in zip(PROMPTS, REPLIES, strict=True)
    ]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code = "import sys; from kilnlm.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "reward", "score", "--model", str(model_dir)]
    cmd += ["--data", str(data), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    return [row["chosen"] for row in json.loads(out)]


@pytest.mark.ray
def test_rl_reward_task_equals_kiln_reward_score(ray_cluster, reward_model, tmp_path):
    from kilnlm.cluster.rl_reward import score_rewards

    tok = load_tokenizer(reward_model)
    texts = [tok.decode(prompt_ids(tok, p)) for p in PROMPTS]
    in_task = score_rewards(str(reward_model), PROMPTS, texts, REPLIES)
    expected = kiln_reward_score(reward_model, tmp_path)
    assert len(set(expected)) == len(expected)  # the replies do get different rewards
    # one padded batch here, pairs of rows there: equal up to float32 summation order
    torch.testing.assert_close(torch.tensor(in_task), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_a_folder_that_is_not_a_reward_model_is_refused(tmp_path):
    from kilnlm.rl.reward import reward_kind

    plain = make_checkpoint(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a reward model"):
        reward_kind(str(plain))
    with pytest.raises(ValueError, match="not an export"):
        reward_kind(str(tmp_path))
    with pytest.raises(ValueError, match="neither a folder"):
        reward_kind("no_such_thing")
    assert reward_kind("kilnlm.rl.reward:toy_reward") == "function"


@pytest.mark.ray
def test_a_reward_module_of_the_current_directory_travels_with_the_task(
    ray_cluster, tmp_path, monkeypatch
):
    """``kiln rl --reward mod:fn`` run from the folder holding mod.py (or a package): the task
    imports the copy that travelled with it (written on the task's node), so a node without
    this machine's folders runs the same code; a module installed in the environment does not
    travel. Each reward reports whether its module was the travelled copy."""
    from kilnlm.cluster.rl_reward import reward_module_path, reward_sources, score_rewards

    body = (
        "def reward(prompt, completion):\n"
        "    return len(completion) + (0.5 if 'kiln-reward-src-' in __file__ else 0.0)\n"
    )
    (tmp_path / "kiln_test_reward_mod.py").write_text(body, encoding="utf-8")
    package = tmp_path / "kiln_test_reward_pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "sub" / "__init__.py").write_text("", encoding="utf-8")
    (package / "sub" / "rules.py").write_text(body, encoding="utf-8")
    monkeypatch.chdir(tmp_path)

    assert reward_module_path("kiln_test_reward_mod:reward") == tmp_path / "kiln_test_reward_mod.py"
    assert reward_module_path("kiln_test_reward_pkg.sub.rules:reward") == package
    assert reward_module_path("kilnlm.rl.reward:toy_reward") is None  # installed everywhere
    assert reward_module_path(str(tmp_path)) is None  # a reward-model folder
    assert set(reward_sources("kiln_test_reward_pkg.sub.rules:reward") or {}) == {
        "kiln_test_reward_pkg/__init__.py",
        "kiln_test_reward_pkg/sub/__init__.py",
        "kiln_test_reward_pkg/sub/rules.py",
    }

    prompts = [RLPrompt(text="p")] * 2
    for spec in ("kiln_test_reward_mod:reward", "kiln_test_reward_pkg.sub.rules:reward"):
        rewards = score_rewards(spec, prompts, ["p", "p"], ["ab", "abcd"])
        assert rewards == [2.5, 4.5], spec  # the travelled copy, not this folder's file
