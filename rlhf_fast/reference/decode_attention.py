"""One-query attention over a KV cache in plain PyTorch: the CPU path and test oracle of `decode_attention`."""
from __future__ import annotations

import math

import torch

from .causal_attention import compute_dtype


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     *, scale: float | None = None, backend: str = "reference") -> torch.Tensor:
    """Attention of one new query per sequence over the first cache_seqlens[b] cache positions.

    q (B, Hq, D), k_cache and v_cache (B, Hkv, Tmax, D), cache_seqlens int32 (B,) in [0, Tmax].
    Returns (B, Hq, D) in q's dtype; a row with cache_seqlens[b] == 0 attends to nothing and returns 0.
    Computes in fp32 for half-precision inputs (fp64 for fp64).
    """
    out_dtype = q.dtype
    ct = compute_dtype(q.dtype)
    b, hq, d = q.shape
    hkv, tmax = k_cache.shape[1], k_cache.shape[2]
    full = False  # every row's length is tmax: nothing to mask
    span = host_length_span(cache_seqlens)
    if span is not None:  # attend over the longest row's slots only; no masks where every row fills them
        tmax, full = span[1], span[0] == span[1] > 0
        k_cache, v_cache = k_cache[:, :, :tmax], v_cache[:, :, :tmax]
    q, k, v = q.to(ct), k_cache.to(ct), v_cache.to(ct)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.view(b, hkv, hq // hkv, d)  # query heads grouped by the KV head they read
    scores = (qg @ k.transpose(-1, -2)) * scale  # (B, Hkv, G, Tmax)
    if full:
        return (scores.softmax(dim=-1) @ v).reshape(b, hq, d).to(out_dtype)
    valid = torch.arange(tmax, device=q.device)[None, :] < cache_seqlens.to(q.device).long()[:, None]  # (B, Tmax)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    # all-masked rows (cache_seqlens 0) give 0, not the NaN of softmax over only -inf; a NaN inside a
    # row's length still reaches its output, as in any attention
    probs = scores.softmax(dim=-1).masked_fill(~valid.any(-1)[:, None, None, None], 0.0)
    # slots past a row's length may hold anything (NaN from a reused buffer): 0 * NaN would reach the sum
    v = v.masked_fill(~valid[:, None, :, None], 0.0)
    return (probs @ v).reshape(b, hq, d).to(out_dtype)


def host_length_span(cache_seqlens: torch.Tensor) -> tuple[int, int] | None:
    """(shortest, longest) cache length on CPU, where reading them costs no device sync (a decode step's
    lengths are usually all equal, and the cache is longer than any of them); None on a GPU, where the
    step must not sync (CUDA graphs), and while torch.compile traces."""
    if cache_seqlens.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    shortest, longest = cache_seqlens.aminmax()
    return int(shortest), int(longest)
