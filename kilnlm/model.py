"""kilnlm's decoder-only transformer, in one file.

Read top to bottom: the config, the position encodings (RoPE with linear / YaRN scaling, or the
classic sinusoidal table), attention (grouped-query, sliding window, causal or not), the MLP
(SwiGLU or GELU), the block, the model, and the preallocated KV cache used for generation.

One ``forward`` serves training, prefill and decode: it takes token ids, their absolute
positions, and optionally a cache. A cache is anything with ``update(layer, k, v, positions)``
that stores the new keys/values and returns every key/value the queries may attend to, with the
absolute position of each key (-1 for empty slots). The contiguous ``KVCache`` below and the
engine's paged cache both implement it, so the model never knows which one it is talking to.

Module names follow the Hugging Face Llama layout (``q_proj``, ``gate_proj``, ...) and RoPE uses
the same rotate-half convention, so weights map one-to-one (see ``kilnlm.checkpoint``).
The model knows nothing of parallelism, Ray or serving: FSDP is applied from outside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------
# Config


@dataclass
class RopeScaling:
    """Context extension for RoPE: stretch a model trained on ``original_max_position_embeddings``."""

    type: Literal["linear", "yarn"]
    """linear: position interpolation (divide every frequency by ``factor``).
    yarn: interpolate low frequencies, keep high ones, and scale attention (YaRN paper)."""
    factor: float
    """How many times longer the new context is than the original one."""
    original_max_position_embeddings: int | None = None
    """Context length the model was trained with (required by yarn)."""
    beta_fast: float = 32.0
    """yarn: rotations above which a dimension is extrapolated (kept as is)."""
    beta_slow: float = 1.0
    """yarn: rotations below which a dimension is fully interpolated."""

    def __post_init__(self) -> None:
        if self.type not in ("linear", "yarn"):
            raise ValueError(f"rope_scaling.type must be 'linear' or 'yarn', got {self.type!r}")
        if not self.factor >= 1.0:
            raise ValueError(f"rope_scaling.factor must be >= 1, got {self.factor}")
        if self.type == "yarn" and not self.original_max_position_embeddings:
            raise ValueError("rope_scaling.original_max_position_embeddings is required for yarn")


@dataclass
class ModelConfig:
    """Shape and recipe of a decoder-only transformer. Derived sizes are properties, never stored twice."""

    vocab_size: int = 8192
    """Number of token ids (the tokenizer's vocabulary, special tokens included)."""
    block_size: int = 512
    """Context length: the most positions a sequence may use (after any RoPE scaling)."""
    n_layer: int = 4
    n_head: int = 4
    """Query heads."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention); None means n_head (multi-head attention)."""
    n_embd: int = 256
    intermediate_size: int | None = None
    """MLP hidden width; None picks 4·n_embd for GELU and ≈8/3·n_embd (rounded to 64) for SwiGLU."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    pos_emb: Literal["rope", "sinusoidal"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    """Each query sees at most this many most recent positions (itself included); None = all."""
    tie_embeddings: bool = False
    """Share the token embedding with the output projection (logits = h · Eᵀ)."""
    causal: bool = True
    """False gives a bidirectional encoder for the masked-LM objective."""
    bias: bool = False
    """Biases in linear layers and LayerNorm (the classic GPT-2 recipe has them)."""
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        positive = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})"
            )
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.intermediate_size is None:
            hidden = 4 * self.n_embd if self.mlp == "gelu" else int(8 * self.n_embd / 3)
            self.intermediate_size = 64 * math.ceil(hidden / 64)
        for name, allowed in (
            ("norm", ("rmsnorm", "layernorm")),
            ("mlp", ("swiglu", "gelu")),
            ("pos_emb", ("rope", "sinusoidal")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.rope_scaling is not None and self.pos_emb != "rope":
            raise ValueError("rope_scaling needs pos_emb='rope'")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named size (see PRESETS) with any field overridden, e.g. ``vocab_size`` from the tokenizer."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # ~1M parameters: unit tests, seconds on a laptop CPU.
    "test-1m": ModelConfig(
        vocab_size=2048, block_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=128
    ),
    # ~3M: the local main job (minutes on 2 CPU cores).
    "tiny-3m": ModelConfig(
        vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=192
    ),
    # ~10M: hot-swap and serving benchmarks.
    "small-10m": ModelConfig(
        vocab_size=8192, block_size=512, n_layer=6, n_head=6, n_kv_head=2, n_embd=288
    ),
    # ~100M (GPT-2 small shape, Llama recipe).
    "base-100m": ModelConfig(
        vocab_size=32000, block_size=1024, n_layer=12, n_head=12, n_kv_head=4, n_embd=768
    ),
    # ~1.1B (TinyLlama shape): GPU only.
    "llama-1b": ModelConfig(
        vocab_size=32000,
        block_size=2048,
        n_layer=22,
        n_head=32,
        n_kv_head=4,
        n_embd=2048,
        intermediate_size=5632,
    ),
}


# --------------------------------------------------------------------------------------------
# Positions


def rope_inv_freq(cfg: ModelConfig) -> tuple[Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the attention scale that multiplies cos/sin."""
    dim, base = cfg.head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    if scaling.type == "linear":
        return inv_freq / scaling.factor, 1.0
    return yarn_inv_freq(inv_freq, dim, base, scaling)


def yarn_inv_freq(inv_freq: Tensor, dim: int, base: float, s: RopeScaling) -> tuple[Tensor, float]:
    """YaRN: dimensions that rotate many times over the original context keep their frequency,
    slow ones are interpolated, with a linear ramp in between; attention gets 0.1·ln(s)+1."""
    assert s.original_max_position_embeddings is not None

    def correction_dim(n_rotations: float) -> float:
        return (
            dim
            * math.log(s.original_max_position_embeddings / (n_rotations * 2 * math.pi))
            / (2 * math.log(base))
        )

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (original frequency), 0 = interpolate
    inv_freq = (inv_freq / s.factor) * (1 - keep) + inv_freq * keep
    attention_scale = 0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0
    return inv_freq, attention_scale


class RotaryEmbedding(nn.Module):
    """cos/sin for arbitrary absolute positions, computed on the fly (positions may be ragged)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attention_scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs)
        return (emb.cos() * self.attention_scale).to(dtype), (emb.sin() * self.attention_scale).to(
            dtype
        )


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, nh, T, hs); cos/sin: (B, T, hs)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def sinusoidal_table(n_positions: int, dim: int) -> Tensor:
    """The classic absolute encoding: sin on even dims, cos on odd dims, wavelengths up to 10000·2π."""
    pos = torch.arange(n_positions, dtype=torch.float)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div[: dim // 2])
    return table


# --------------------------------------------------------------------------------------------
# Attention


class Cache(Protocol):
    """What attention needs from a KV cache (contiguous or paged)."""

    def update(
        self, layer: int, k: Tensor, v: Tensor, positions: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Store k, v (B, n_kv, T, hs) at ``positions`` (B, T); return the keys and values to attend
        to, (B, n_kv, S, hs) each, and the absolute position of every key (B, S), -1 where empty."""
        ...


def attention_mask(q_pos: Tensor, k_pos: Tensor, causal: bool, window: int | None) -> Tensor:
    """Boolean (B, 1, T, S) mask, True where query at q_pos (B, T) may see key at k_pos (B, S)."""
    q, k = q_pos[:, None, :, None], k_pos[:, None, None, :]
    allowed = k >= 0
    if causal:
        allowed = allowed & (k <= q)
    if window is not None:
        allowed = allowed & (k > q - window) & (k < q + window)
    return allowed


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 even under bf16: the mean of squares loses too much precision otherwise.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hs, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
        assert nkv is not None
        self.q_proj = nn.Linear(cfg.n_embd, nh * hs, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, nkv * hs, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, nkv * hs, bias=cfg.bias)
        self.o_proj = nn.Linear(nh * hs, cfg.n_embd, bias=cfg.bias)

    def forward(
        self, x: Tensor, positions: Tensor, rope: tuple[Tensor, Tensor] | None, cache: Cache | None
    ) -> Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = (
            self.k_proj(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        )  # (B, nkv, T, hs)
        v = (
            self.v_proj(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        )  # (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v, k_pos = cache.update(self.layer, k, v, positions)  # (B, nkv, S, hs), (B, S)
        else:
            k_pos = positions
        # A whole sequence without window takes SDPA's fused (flash) path with no mask tensor;
        # a cache or a window needs an explicit mask built from absolute positions.
        plain = cache is None and cfg.sliding_window is None
        mask = None if plain else attention_mask(positions, k_pos, cfg.causal, cfg.sliding_window)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=plain and cfg.causal,
            enable_gqa=cfg.n_kv_head != cfg.n_head,
        )  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        inner = cfg.intermediate_size
        assert inner is not None
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.n_embd, inner, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, inner, bias=cfg.bias)
        self.down_proj = nn.Linear(inner, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self, x: Tensor, positions: Tensor, rope: tuple[Tensor, Tensor] | None, cache: Cache | None
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), positions, rope, cache)
        return x + self.mlp(self.mlp_norm(x))


# --------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, init_weights: bool = True):
        """``init_weights=False`` skips the random init when weights are loaded next (most of load time)."""
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg) if cfg.pos_emb == "rope" else None
        if cfg.pos_emb == "sinusoidal":
            self.register_buffer(
                "pos_table", sinusoidal_table(cfg.block_size, cfg.n_embd), persistent=False
            )
        if init_weights:
            self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 init: N(0, init_std), residual output projections scaled by 1/sqrt(2·n_layer).

        Parameters are drawn in ``named_parameters`` order from ``generator`` (default: torch's
        global one), so a sharded model that draws each full tensor in the same order and keeps
        only its slice (``kilnlm.cluster.parallelize``) gets exactly these values.
        """
        for name, p in self.named_parameters():
            self.init_parameter(name, p, generator)

    def init_parameter(
        self, name: str, p: Tensor, generator: torch.Generator | None = None
    ) -> None:
        """Fill parameter ``name`` (or a full-size stand-in ``p`` for it) with its initial values."""
        std = self.config.init_std
        if p.dim() == 1:
            nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer), generator)
        else:
            nn.init.normal_(p, 0.0, std, generator)

    @torch.no_grad()
    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the derived buffers (RoPE frequencies, sinusoidal table) on ``device``
        (default: the parameters'; with parameters offloaded to the CPU, the compute device).

        They are not parameters and not saved: a model built on the meta device and materialised
        with ``to_empty`` holds garbage in them until this runs.
        """
        device = device or self.embed_tokens.weight.device
        if self.rope is not None:
            self.rope.inv_freq = rope_inv_freq(self.config)[0].to(device)
        if self.config.pos_emb == "sinusoidal":
            self.pos_table = sinusoidal_table(self.config.block_size, self.config.n_embd).to(device)

    def forward(
        self,
        idx: Tensor,
        positions: Tensor | None = None,
        cache: Cache | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits (B, T, V) for token ids idx (B, T) at absolute ``positions`` (default 0..T-1).

        With ``cache``, keys/values of earlier positions come from the cache (prefill or decode).
        ``last_only`` returns only the last position's logits (B, 1, V): prefill needs no more.
        """
        B, T = idx.shape
        if positions is None:
            if T > self.config.block_size:
                raise ValueError(
                    f"sequence of {T} tokens is longer than the context ({self.config.block_size})"
                )
            positions = torch.arange(T, device=idx.device).expand(B, T)
        x = self.embed_tokens(idx)  # (B, T, C)
        if self.config.pos_emb == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        rope = self.rope(positions, x.dtype) if self.rope is not None else None
        for block in self.blocks:
            x = block(x, positions, rope, cache)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)  # (B, T, V)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); non_embedding leaves out the token embedding."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6·N plus the attention-score term."""
        return flops_per_token(self.config, seq_len)


def num_params(cfg: ModelConfig, non_embedding: bool = False) -> int:
    """Parameter count from the config alone (no allocation), equal to Transformer(cfg).num_params()."""
    C, L, V, H = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.intermediate_size
    assert H is not None and cfg.n_kv_head is not None
    kv = cfg.n_kv_head * cfg.head_dim
    attn = C * C * 2 + 2 * C * kv + (2 * C + 2 * kv if cfg.bias else 0)
    mlp = (3 if cfg.mlp == "swiglu" else 2) * C * H + (
        (2 if cfg.mlp == "swiglu" else 1) * H + C if cfg.bias else 0
    )
    norm = C * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    total = L * (attn + mlp + 2 * norm) + norm + V * C * (1 if cfg.tie_embeddings else 2)
    return total - V * C if non_embedding else total


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """6·N (non-embedding matmuls, forward + backward) + 6·L·T·C for attention scores (PaLM, app. B)."""
    T = seq_len or cfg.block_size
    if cfg.sliding_window:
        T = min(T, cfg.sliding_window)
    return 6 * num_params(cfg, non_embedding=True) + 6 * cfg.n_layer * T * cfg.n_embd


# --------------------------------------------------------------------------------------------
# Contiguous KV cache (generation); the serving engine has a paged one with the same interface


class KVCache(nn.Module):
    """Preallocated keys/values for a batch of B sequences of up to max_len positions each."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        assert cfg.n_kv_head is not None
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer(
            "pos", torch.full((batch_size, max_len), -1, device=device), persistent=False
        )
        self.max_len = max_len
        self.length = 0  # high-water mark: attention reads only [0, length)

    def update(
        self, layer: int, k: Tensor, v: Tensor, positions: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        if layer == 0:  # positions are the same for every layer: record them once per forward
            top = int(positions.max()) + 1
            if top > self.max_len:
                raise ValueError(f"position {top - 1} is past the cache's {self.max_len} slots")
            self.pos.scatter_(1, positions, positions)
            self.length = max(self.length, top)
        index = positions[:, None, :, None].expand_as(k)  # (B, nkv, T, hs)
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        n = self.length
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n], self.pos[:, :n]

    def reorder(self, rows: Sequence[int]) -> None:
        """Row j takes over the keys, values and positions of row ``rows[j]`` (beam search: a
        beam continues from its new parent). ``rows`` has one entry per row of the batch."""
        batch = self.k.shape[1]
        if len(rows) != batch or not all(0 <= r < batch for r in rows):
            raise ValueError(f"reorder needs {batch} row indices in [0, {batch}), got {list(rows)}")
        index = torch.tensor(list(rows), device=self.k.device)
        self.k.copy_(self.k.index_select(1, index))  # (L, B, nkv, S, hs)
        self.v.copy_(self.v.index_select(1, index))
        self.pos.copy_(self.pos.index_select(0, index))  # (B, S)

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    """2 · n_layers · n_kv_heads · d_head · bytes_per_element (DESIGN.md)."""
    assert cfg.n_kv_head is not None
    return (
        2
        * cfg.n_layer
        * cfg.n_kv_head
        * cfg.head_dim
        * torch.tensor([], dtype=dtype).element_size()
    )


__all__ = [
    "PRESETS",
    "Cache",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "flops_per_token",
    "kv_cache_bytes_per_token",
    "num_params",
]
