"""``kiln rl``'s argument handling, without Ray (the live loop is tests/test_rl_live.py)."""

from __future__ import annotations

import pytest

from kilnlm.cli import main
from kilnlm.cli.rl import read_prompts


def test_read_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "w:"}\n\n{"prompt": "x"}\n')
    assert read_prompts(str(f)) == ("w:", "x")
    f.write_text('{"messages": []}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:1"):
        read_prompts(str(f))


def test_missing_arguments_and_reward_models_are_refused(tmp_path, capsys):
    assert main(["rl", "--out", str(tmp_path)]) == 2
    assert "--policy, --reward and --prompts" in capsys.readouterr().err
    (tmp_path / "p.jsonl").write_text('{"prompt": "w:"}\n')
    argv = ["rl", "--policy", str(tmp_path), "--reward", str(tmp_path), "--out", str(tmp_path)]
    assert main([*argv, "--prompts", str(tmp_path / "p.jsonl")]) == 2
    assert "module:function" in capsys.readouterr().err
