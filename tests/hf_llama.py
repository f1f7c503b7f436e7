"""A plain Hugging Face Llama directory built offline, as the Hub ships one.

Not a test module: the tests that serve, score and chat with a foreign model import it.
transformers' ``LlamaForCausalLM`` writes ``config.json`` and ``model.safetensors``; a byte-level
``tokenizers`` BPE with Llama 2's specials (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2) is saved through
transformers' ``PreTrainedTokenizerFast`` (so ``tokenizer.json`` carries the BOS post-processor
transformers writes), and ``tokenizer_config.json`` holds the Llama 2 chat template as Hub
checkpoints of that generation do (a string field, ``raise_exception`` on roles that do not
alternate, ``bos_token``/``eos_token`` variables). No kilnlm file, no manifest, no download.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT = (
    "The kiln fires clay into stone. A potter shapes the clay on a wheel, lets it dry, and "
    "loads the kiln with bowls, cups and plates. Heat rises slowly; the glaze melts and flows. "
    "Después, la cerámica se enfría — 陶器 🏺 — and the potter opens the kiln to see the work. "
)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
GENERATION = {"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.6, "top_p": 0.9}


def make_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT * 8], trainer=trainer)
    return tok


def make_hf_llama(path: Path, seed: int = 0) -> Path:
    """Write the directory; returns ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    rust = make_tokenizer()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=rust, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        add_bos_token=True,
    )  # fmt: skip
    hf_tok.save_pretrained(path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config |= {"chat_template": LLAMA2_TEMPLATE, "add_bos_token": True, "add_eos_token": False}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=rust.get_vocab_size(), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # EOS never wins greedy decoding: long generations stay long
        model.lm_head.weight[2].zero_()
    model.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps(GENERATION))
    return path
