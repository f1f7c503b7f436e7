"""The toy where the RL target is known exactly: enumerate every completion, compute π* and KLs.

A completion is a sequence of alphabet ids after a fixed prompt that ends with ``<|eos|>`` or
reaches ``max_len`` ids (what a sampler restricted to the alphabet and eos, with
``max_tokens = max_len``, can produce, and nothing else). There are A^0 + ... + A^(max_len-1)
eos-terminated completions and A^max_len full-length ones (A letters): 1365 for A = 4,
max_len = 5, so every distribution over them fits in one vector.

Sampling is restricted to the alphabet and eos: ``restrict_to`` sets every other logit to -inf,
so softmax renormalises over the allowed ids. The enumeration uses exactly that distribution, so
it covers exactly what can be sampled.

The log-prob of every completion comes from one forward pass per length level: level L holds
all A^L letter prefixes (the internal nodes of the completion trie at depth L); the last
position's restricted log-softmax gives each node's A + 1 children. A completion's log-prob is a
path sum down the trie. max_len forwards instead of one per completion, and differentiable, so
the exact gradient of KL(πθ‖π*) is one ``backward``.

With π0 the reference policy, r the reward and β the trust in the prior:
π*(x) = π0(x)·exp(r(x)/β) / Z, and E_πθ[r] − β·KL(πθ‖π0) = −β·KL(πθ‖π*) + β·log Z.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Completion = tuple[int, ...]


@dataclass(frozen=True)
class ToySpec:
    """What can be sampled: the allowed ids, the fixed prompt and the longest completion."""

    alphabet_ids: tuple[int, ...]
    """The letters' token ids (each letter one id), in the order enumeration uses."""
    eos_id: int
    """``<|eos|>``: ends a completion (its log-prob counts; its text is not shown to the reward)."""
    prompt_ids: tuple[int, ...]
    max_len: int
    """A completion has at most this many ids (eos included); one that reaches it stops there."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphabet_ids", tuple(int(i) for i in self.alphabet_ids))
        object.__setattr__(self, "prompt_ids", tuple(int(i) for i in self.prompt_ids))
        if not self.alphabet_ids or len(set(self.alphabet_ids)) != len(self.alphabet_ids):
            raise ValueError(
                f"alphabet_ids must be distinct and non-empty, got {self.alphabet_ids}"
            )
        if self.eos_id in self.alphabet_ids:
            raise ValueError(f"eos_id {self.eos_id} must not be one of the alphabet_ids")
        if min(self.alphabet_ids) < 0 or self.eos_id < 0:
            raise ValueError("token ids must be >= 0")
        if not self.prompt_ids:
            raise ValueError("prompt_ids must hold at least one id (the model needs a position)")
        if not 1 <= self.max_len <= 8:
            raise ValueError(
                f"max_len must be in [1, 8] (enumeration is exponential), got {self.max_len}"
            )

    @property
    def allowed_ids(self) -> tuple[int, ...]:
        """Alphabet then eos: the columns of every restricted distribution, in this order."""
        return (*self.alphabet_ids, self.eos_id)

    def to_dict(self) -> dict[str, Any]:
        """The keys ``toy.json`` shares with this spec (issue 13's names)."""
        return {
            "alphabet_ids": list(self.alphabet_ids),
            "eos_id": self.eos_id,
            "prompt_ids": list(self.prompt_ids),
            "max_len": self.max_len,
        }

    def record(self, beta: float, pi0: str, versions: Sequence[tuple[int, str]]) -> dict[str, Any]:
        """``toy.json``: enough to recompute π* and every KL from the exports with other code
        (``versions``: (version, export folder) in promotion order)."""
        return {
            **self.to_dict(),
            "beta": beta,
            "pi0": pi0,
            "versions": [{"version": v, "path": path} for v, path in versions],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToySpec:
        """From a ``toy.json`` (extra keys such as beta or versions are ignored)."""
        return cls(tuple(d["alphabet_ids"]), d["eos_id"], tuple(d["prompt_ids"]), d["max_len"])


# --------------------------------------------------------------------------------------------
# The logits transform sampling uses (the engine applies the same function)


def allowed_mask(allowed: Sequence[int] | Tensor, vocab_size: int, device: Any = None) -> Tensor:
    """Boolean (V,) mask, True at the allowed ids; a Tensor mask is checked and passed through."""
    if isinstance(allowed, Tensor) and allowed.dtype == torch.bool:
        if allowed.shape[-1] != vocab_size:
            raise ValueError(
                f"allowed mask has {allowed.shape[-1]} columns, vocab has {vocab_size}"
            )
        return allowed.to(device) if device is not None else allowed
    ids = torch.as_tensor(list(allowed) if not isinstance(allowed, Tensor) else allowed)
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(
            f"allowed ids must be non-empty and in [0, {vocab_size}), got {ids.tolist()}"
        )
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[ids.to(mask.device)] = True
    return mask


def restrict_to(logits: Tensor, allowed: Sequence[int] | Tensor) -> Tensor:
    """Logits (..., V) with every id outside ``allowed`` at -inf: softmax renormalises over the rest.

    ``allowed`` is a list of ids (every row the same) or a boolean mask (V,) or (B, V) (each row
    its own set), so a batch whose rows carry different restrictions stays one tensor op.
    """
    mask = allowed_mask(allowed, logits.size(-1), logits.device)
    return logits.masked_fill(~mask, float("-inf"))


def restricted_logprobs(logits: Tensor, allowed: Sequence[int] | Tensor | None) -> Tensor:
    """log-softmax (..., V) in fp32 after ``restrict_to`` (no restriction when ``allowed`` is None)."""
    logits = logits.float()
    if allowed is not None:
        logits = restrict_to(logits, allowed)
    return F.log_softmax(logits, dim=-1)


# --------------------------------------------------------------------------------------------
# Enumeration


def enumerate_completions(spec: ToySpec) -> list[Completion]:
    """Every completion: letters + eos by number of letters (0 .. max_len-1), then the full-length
    ones; within a length, in ``itertools.product`` order of the alphabet."""
    out: list[Completion] = []
    for k in range(spec.max_len):
        out += [(*p, spec.eos_id) for p in itertools.product(spec.alphabet_ids, repeat=k)]
    out += list(itertools.product(spec.alphabet_ids, repeat=spec.max_len))
    return out


def level_logprobs(model: nn.Module, spec: ToySpec) -> list[Tensor]:
    """levels[L]: (A^L, A+1) restricted log-probs of each allowed id after each L-letter prefix.

    One forward per level over every prefix of that length (rows in product order).
    """
    device = next(model.parameters()).device
    prompt = torch.tensor(spec.prompt_ids, device=device)
    allowed = torch.tensor(spec.allowed_ids, device=device)
    A = len(spec.alphabet_ids)
    levels = []
    for L in range(spec.max_len):
        prefixes = torch.tensor(
            list(itertools.product(spec.alphabet_ids, repeat=L)), dtype=torch.long, device=device
        ).reshape(A**L, L)  # (A^L, L)
        idx = torch.cat([prompt.expand(prefixes.size(0), -1), prefixes], dim=1)  # (A^L, P+L)
        logits = model(idx, last_only=True)[:, 0]  # (A^L, V)
        levels.append(restricted_logprobs(logits, allowed)[:, allowed])  # (A^L, A+1)
    return levels


def completion_logprobs(model: nn.Module, spec: ToySpec) -> Tensor:
    """log π(x) (N,) for every completion, in ``enumerate_completions`` order (differentiable)."""
    A = len(spec.alphabet_ids)
    levels = level_logprobs(model, spec)
    prefix = torch.zeros(1, device=levels[0].device)  # log-prob of the empty prefix
    parts = []
    for lp in levels:
        parts.append(prefix + lp[:, A])  # stop here: prefix + eos
        prefix = (prefix[:, None] + lp[:, :A]).reshape(-1)  # child p·A + j in product order
    parts.append(prefix)  # reached max_len
    return torch.cat(parts)


# --------------------------------------------------------------------------------------------
# Exact distributions


def posterior_logprobs(logp0: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """log π*(x) = log π0(x) + r(x)/β − log Z."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    unnorm = logp0 + rewards / beta
    return unnorm - torch.logsumexp(unnorm, dim=0)


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p‖q) = Σ p·(log p − log q) over the enumeration (0·log 0 = 0)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum()


def total_variation(logp: Tensor, logq: Tensor) -> Tensor:
    """½ Σ |p − q|."""
    return 0.5 * (logp.exp() - logq.exp()).abs().sum()


def letters_of(completion: Sequence[int], eos_id: int) -> list[int]:
    """The ids the reward sees as text: the completion without its eos."""
    return [t for t in completion if t != eos_id]


def completion_rewards(
    spec: ToySpec,
    completions: Sequence[Completion],
    reward: Callable[[str, str], float],
    decode: Callable[[Sequence[int]], str],
) -> Tensor:
    """r(x) (N,) from a reward on (prompt text, completion text without eos)."""
    prompt = decode(spec.prompt_ids)
    return torch.tensor(
        [float(reward(prompt, decode(letters_of(c, spec.eos_id)))) for c in completions],
        dtype=torch.float64,
    )


@dataclass(frozen=True)
class ToyMetrics:
    """Exact figures of one policy against the toy's target."""

    kl_to_target: float
    """KL(πθ‖π*): the objective, up to constants (0 at the optimum)."""
    kl_to_reference: float
    """KL(πθ‖π0): what the policy paid for its reward."""
    total_variation: float
    """½ Σ |πθ − π*|."""
    mean_reward: float
    """E_πθ[r]."""


@dataclass
class ToyPosterior:
    """π0, r and β over the enumeration, and π* derived from them (never stored twice)."""

    spec: ToySpec
    logp0: Tensor
    rewards: Tensor
    beta: float
    completions: list[Completion] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.completions:
            self.completions = enumerate_completions(self.spec)
        n = len(self.completions)
        if self.logp0.shape != (n,) or self.rewards.shape != (n,):
            raise ValueError(f"logp0 and rewards must have one entry per completion ({n})")
        self.logp0 = self.logp0.detach().double()
        self.rewards = self.rewards.double()
        self._index = {c: i for i, c in enumerate(self.completions)}

    @classmethod
    def of(
        cls,
        pi0: nn.Module,
        spec: ToySpec,
        reward: Callable[[str, str], float],
        decode: Callable[[Sequence[int]], str],
        beta: float,
    ) -> ToyPosterior:
        """Enumerate under ``pi0`` and score every completion with ``reward``."""
        completions = enumerate_completions(spec)
        with torch.no_grad():
            logp0 = completion_logprobs(pi0, spec)
        rewards = completion_rewards(spec, completions, reward, decode)
        return cls(spec, logp0, rewards, beta, completions)

    @property
    def log_target(self) -> Tensor:
        """log π* (N,)."""
        return posterior_logprobs(self.logp0, self.rewards, self.beta)

    def index(self, completion: Sequence[int]) -> int:
        """Position of a sampled completion in the enumeration (KeyError: not a completion)."""
        return self._index[tuple(completion)]

    def reward_of(self, completion: Sequence[int]) -> float:
        return float(self.rewards[self.index(completion)])

    def measure(self, logp: Tensor) -> ToyMetrics:
        """Exact KLs, TV and mean reward of a policy given its log-probs over the enumeration."""
        logp = logp.detach().double()
        return ToyMetrics(
            kl_to_target=float(kl(logp, self.log_target)),
            kl_to_reference=float(kl(logp, self.logp0)),
            total_variation=float(total_variation(logp, self.log_target)),
            mean_reward=float((logp.exp() * self.rewards).sum()),
        )

    def measure_model(self, model: nn.Module) -> ToyMetrics:
        with torch.no_grad():
            return self.measure(completion_logprobs(model, self.spec))

    def kl_target_loss(self, model: nn.Module) -> Tensor:
        """KL(πθ‖π*) as a differentiable function of the model: exact gradient descent's loss."""
        logp = completion_logprobs(model, self.spec).double()
        return kl(logp, self.log_target)


__all__ = [
    "Completion",
    "ToyMetrics",
    "ToyPosterior",
    "ToySpec",
    "allowed_mask",
    "completion_logprobs",
    "completion_rewards",
    "enumerate_completions",
    "kl",
    "letters_of",
    "level_logprobs",
    "posterior_logprobs",
    "restrict_to",
    "restricted_logprobs",
    "total_variation",
]
