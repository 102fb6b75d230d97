"""Logits -> tokens: greedy, temperature, top-k and top-p (nucleus) sampling.

Pure functions over the last dimension (the vocabulary); any leading dims are batch dims. Randomness
only comes from an explicit `torch.Generator`, so a seed fixes every draw.
"""

from __future__ import annotations

import torch


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the argument if a sampling setting is out of range."""
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., vocab] -> argmax token ids [...] (ties: the lowest id)."""
    return logits.argmax(dim=-1)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row, -inf elsewhere (ties at the k-th value are all kept)."""
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # [..., 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the nucleus: the smallest set of most likely tokens whose probability sums to >= p.

    The most likely token is always kept, so p -> 0 degenerates to greedy rather than to nothing."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    # mass strictly before each token: a token belongs to the nucleus if that mass is still < p
    before = probs.cumsum(dim=-1) - probs
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def probabilities(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The sampling distribution [..., vocab] (fp32) for temperature > 0: logits / T, then top-k,
    then top-p, then softmax. Speculative decoding compares exactly these for draft and target."""
    if temperature <= 0.0:
        raise ValueError("probabilities needs temperature > 0; temperature 0 is greedy (use `greedy`)")
    scaled = logits.float() / temperature
    if top_k is not None:
        scaled = filter_top_k(scaled, top_k)
    if top_p is not None:
        scaled = filter_top_p(scaled, top_p)
    return scaled.softmax(dim=-1)


def sample_from(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """probs [..., vocab] -> one token id per row [...], drawn with `generator`."""
    flat = probs.reshape(-1, probs.shape[-1])  # [rows, vocab]
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def sample(
    logits: torch.Tensor,
    generator: torch.Generator | None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """logits [..., vocab] -> token ids [...]: greedy at temperature 0, else a draw from
    `probabilities(logits, temperature, top_k, top_p)`."""
    if temperature == 0.0:
        return greedy(logits)
    if generator is None:
        raise ValueError("sampling at temperature > 0 needs a torch.Generator")
    return sample_from(probabilities(logits, temperature, top_k, top_p), generator)
