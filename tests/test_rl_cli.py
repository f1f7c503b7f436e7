"""``kiln rl``'s argument handling and prompt files, without Ray (the live loop is
tests/test_rl_live.py and tests/test_rl_clients.py)."""

from __future__ import annotations

import json

import pytest
from serving_utils import make_checkpoint

from kilnlm.chat import encode_chat
from kilnlm.checkpoint import load_tokenizer
from kilnlm.cli import main
from kilnlm.posttrain.data import DataFormatError
from kilnlm.rl.prompts import RLPrompt, prompt_ids, read_prompts

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]


def test_read_prompts_plain_and_chat(tmp_path):
    f = tmp_path / "p.jsonl"
    lines = [{"prompt": "w:"}, {"messages": CHAT}, {"prompt": CHAT}]
    f.write_text(json.dumps(lines[0]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[1:]))
    plain, chat, trl = read_prompts(f)
    assert plain == RLPrompt(text="w:") and plain.request_fields() == {"prompt": "w:"}
    assert chat == trl == RLPrompt.chat(CHAT)
    assert chat.request_fields() == {"messages": CHAT}
    assert plain.reward_messages() == [{"role": "user", "content": "w:"}]
    assert chat.reward_messages() == CHAT


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"text": "w:"}', "exactly one of 'prompt' or 'messages'"),
        ('{"prompt": "a", "messages": []}', "exactly one of"),
        ('{"messages": []}', "messages is empty"),
        ('{"messages": "hi"}', "list of"),
        ('{"prompt": ""}', "empty"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
         "last message is the assistant's"),
    ],
)  # fmt: skip
def test_a_bad_line_names_the_file_and_line(tmp_path, line, problem):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(DataFormatError, match=rf"p\.jsonl:2: .*{problem}"):
        read_prompts(f)


def test_chat_prompt_ids_are_the_chat_template_with_the_generation_prompt(tmp_path):
    """The ids the driver uses (π0's log-probs) are SFT's rendering plus ``<|assistant|>``:
    what the replica encodes a ``messages`` request to."""
    tok = load_tokenizer(make_checkpoint(tmp_path / "m"))
    ids = prompt_ids(tok, RLPrompt.chat(CHAT))
    assert ids == encode_chat(tok, CHAT, add_generation_prompt=True)
    assert ids[-1] == tok.special_id("<|assistant|>") and ids[0] == tok.bos_id
    assert prompt_ids(tok, "w:") == tok.encode_prompt("w:")


def test_missing_arguments_and_bad_rewards_are_refused(tmp_path, capsys):
    assert main(["rl", "--out", str(tmp_path)]) == 2
    assert "--policy, --reward and --prompts" in capsys.readouterr().err
    (tmp_path / "p.jsonl").write_text('{"prompt": "w:"}\n')
    argv = ["rl", "--policy", str(tmp_path), "--out", str(tmp_path)]
    argv += ["--prompts", str(tmp_path / "p.jsonl")]
    assert main([*argv, "--reward", str(tmp_path)]) == 2
    assert "not an export" in capsys.readouterr().err
    assert main([*argv, "--reward", "nonsense"]) == 2
    assert "module:function" in capsys.readouterr().err


def test_prompts_too_long_for_the_context_are_refused_before_ray(tmp_path, capsys):
    policy = make_checkpoint(tmp_path / "m", block_size=32)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "word " * 40}) + "\n")
    argv = ["rl", "--policy", str(policy), "--reward", "kilnlm.rl.reward:toy_reward"]
    assert main([*argv, "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path)]) == 2
    assert "prompt 1" in capsys.readouterr().err


def test_defaults_names_what_to_run_first(tmp_path, capsys):
    assert main(["rl", "--defaults", "--from-dir", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "make posttrain" in capsys.readouterr().err
