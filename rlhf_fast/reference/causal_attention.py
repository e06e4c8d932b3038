"""Causal self-attention in plain PyTorch: the CPU path and the test oracle of `causal_attention`."""
from __future__ import annotations

import math

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 are upcast to fp32 (the kernels accumulate in fp32); fp32 and fp64 stay as they are."""
    return torch.promote_types(dtype, torch.float32)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                     deterministic: bool = False, backend: str = "reference") -> torch.Tensor:
    """softmax(q @ k^T * scale + causal mask) @ v with k/v heads shared by groups of Hq // Hkv query heads.

    q (B, Hq, T, D), k and v (B, Hkv, T, D); returns (B, Hq, T, D) in q's dtype. Computes in fp32 for
    half-precision inputs (in fp64 for fp64 inputs, which is how tests build the oracle). Materialises the
    (T, T) score matrix, so memory is O(T^2): this is math, not a kernel. `deterministic` and `backend`
    exist only so the signature matches the public op; this path is always deterministic.
    """
    out_dtype = q.dtype
    ct = compute_dtype(q.dtype)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)  # (B, Hq, T, D)
        v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    t = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, Hq, T, T)
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(out_dtype)
