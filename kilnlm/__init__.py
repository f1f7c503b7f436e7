"""kilnlm: pretrain decoder-only language models on Ray and serve them hot from the same cluster.

The library (this package) knows nothing of Ray; ``kilnlm.cluster`` and ``kilnlm.actors`` wrap it.
"""

from kilnlm.model import ModelConfig, Transformer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "Transformer", "__version__"]
