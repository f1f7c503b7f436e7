"""A Hugging Face directory's own tokenizer, chat template and generation defaults, against
transformers reading the same files (``AutoTokenizer``, ``apply_chat_template``)."""

from __future__ import annotations

import json
import pickle

import pytest
from hf_llama import LLAMA2_TEMPLATE, TEXT, make_hf_llama

from kilnlm.chat import encode_chat, render_for
from kilnlm.chat_template import render_template
from kilnlm.hf_tokenizer import GenerationDefaults, PretrainedTokenizer

transformers = pytest.importorskip("transformers")

CHATS = [
    [{"role": "user", "content": "Shape the clay."}],
    [
        {"role": "system", "content": "You are a potter."},
        {"role": "user", "content": "What is a kiln?"},
        {"role": "assistant", "content": "An oven for clay."},
        {"role": "user", "content": "  ¿Y el esmalte? 🏺 </s> <s>"},
    ],
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_llama(tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="module")
def ours(hf_dir):
    return PretrainedTokenizer.load(hf_dir)


@pytest.fixture(scope="module")
def theirs(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


def test_specials_are_the_directorys_own(ours, theirs):
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id) == (1, 2)
    assert (ours.bos_token, ours.eos_token) == ("<s>", "</s>")
    assert ours.add_bos_token
    assert {0, 1, 2} <= ours.special_ids


@pytest.mark.parametrize("text", [TEXT, "héllo 🏺 world", " leading space", "a\n\nb"])
def test_prompt_ids_equal_transformers(ours, theirs, text):
    """A completion prompt is what ``tokenizer(text)`` gives: BOS first (add_bos_token)."""
    assert ours.encode_prompt(text) == theirs(text).input_ids
    assert ours.decode(ours.encode(text)) == text


def test_plain_text_cannot_forge_a_special(ours):
    assert 2 not in ours.encode("before </s> after")
    assert 2 in ours.encode_with_specials("before </s> after")


def test_add_bos_token_false_is_honoured(hf_dir, tmp_path):
    import shutil

    other = tmp_path / "nobos"
    shutil.copytree(hf_dir, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps(cfg | {"add_bos_token": False}))
    tok = PretrainedTokenizer.load(other)
    assert tok.encode_prompt("The kiln") == tok.encode("The kiln")


@pytest.mark.parametrize("chat", CHATS, ids=["one-turn", "system-and-history"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_renders_as_apply_chat_template(ours, theirs, chat, add_generation_prompt):
    text = theirs.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert render_for(ours, chat, add_generation_prompt) == text
    ids = theirs.apply_chat_template(
        chat, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert encode_chat(ours, chat, add_generation_prompt) == list(ids)


def test_template_refusal_is_a_value_error_naming_messages(ours):
    bad = [{"role": "assistant", "content": "I speak first"}]
    with pytest.raises(ValueError, match=r"^messages: .*must alternate"):
        encode_chat(ours, bad)


def test_the_template_runs_sandboxed():
    """A template cannot reach Python internals (a Hub template is untrusted code)."""
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ValueError, match="messages"):
        render_template(escape, [{"role": "user", "content": "x"}], {})
    with pytest.raises(ValueError, match="messages"):
        render_template("{% set _ = messages.append(1) %}", [{"role": "user", "content": "x"}], {})


def test_template_trims_blocks_like_transformers():
    source = "{% for m in messages %}\n  {{ m['content'] }}\n{% endfor %}"
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert render_template(source, chat, {}) == "  a\n  b\n"  # untrimmed: "\n  a\n\n  b\n"


def test_no_template_falls_back_to_kilnlms_format(hf_dir, tmp_path):
    import shutil

    other = tmp_path / "notemplate"
    shutil.copytree(hf_dir, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = PretrainedTokenizer.load(other)
    assert tok.chat_template is None
    assert render_for(tok, CHATS[0]) == "<s><|user|>Shape the clay.</s><|assistant|>"


def test_chat_template_jinja_file_is_read(hf_dir, tmp_path):
    """transformers 5 saves the template beside the config as chat_template.jinja."""
    import shutil

    other = tmp_path / "jinjafile"
    shutil.copytree(hf_dir, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    (other / "chat_template.jinja").write_text(cfg.pop("chat_template"))
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert PretrainedTokenizer.load(other).chat_template == LLAMA2_TEMPLATE


def test_generation_config_gives_the_served_defaults(ours):
    assert ours.generation_defaults.to_dict() == {"temperature": 0.6, "top_p": 0.9}
    greedy = GenerationDefaults.from_dict(
        {"do_sample": False, "temperature": 0.6, "max_new_tokens": 64, "eos_token_id": [2, 7]},
        eos_ids=[2, 7],
    )
    assert greedy.to_dict() == {"temperature": 0.0, "max_tokens": 64, "stop_token_ids": [7]}


def test_pickles_across_processes(ours):
    again = pickle.loads(pickle.dumps(ours))
    assert again.to_json() == ours.to_json()
    assert again.encode_prompt(TEXT) == ours.encode_prompt(TEXT)
    assert again.chat_template == ours.chat_template


def test_kilnlm_load_tokenizer_returns_it_for_an_hf_dir(hf_dir):
    import kilnlm

    tok = kilnlm.load_tokenizer(hf_dir)
    assert isinstance(tok, PretrainedTokenizer)
    assert tok.eos_id == 2
