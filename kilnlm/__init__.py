"""kilnlm: pretrain decoder-only language models on Ray and serve them hot from the same cluster.

The library (this package) knows nothing of Ray; ``kilnlm.cluster`` and ``kilnlm.actors`` wrap it.

Public API::

    model = kilnlm.load(path)                 # our export or a Hugging Face Llama directory
    kilnlm.checkpoint.save_pretrained(model, path, tokenizer=tok)  # + config.json + manifest
    out = kilnlm.generate(model, prompt_ids, kilnlm.SamplingParams(...), use_cache=True)
    kilnlm.perplexity(model, ids)
    kilnlm.sampling.process_logits(logits, [params_per_row, ...])
"""

from kilnlm.checkpoint import load, load_tokenizer
from kilnlm.eval import perplexity
from kilnlm.generate import generate
from kilnlm.model import ModelConfig, Transformer
from kilnlm.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = [
    "ModelConfig",
    "SamplingParams",
    "Transformer",
    "__version__",
    "generate",
    "load",
    "load_tokenizer",
    "perplexity",
]
