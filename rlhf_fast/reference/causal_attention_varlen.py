"""Packed-sequence causal attention in plain PyTorch: the CPU path and test oracle of `causal_attention_varlen`."""
from __future__ import annotations

import math

import torch

from .causal_attention import backward as padded_backward
from .causal_attention import causal_attention
from .causal_attention import forward as padded_forward


def causal_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_seqlen: int, *, scale: float | None = None, deterministic: bool = False,
                            backend: str = "reference") -> torch.Tensor:
    """Causal attention within each packed sequence, as flash_attn_varlen_func(causal=True).

    q (total, Hq, D), k and v (total, Hkv, D), cu_seqlens int32 (n + 1,) with sequence i occupying rows
    cu_seqlens[i]:cu_seqlens[i+1]. Returns (total, Hq, D) in q's dtype; rows past cu_seqlens[-1] are 0.
    Loops over the sequences (one host sync to read cu_seqlens); `max_seqlen`, `deterministic` and
    `backend` exist only so the signature matches the public op.
    """
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # (L, H, D) -> (1, H, L, D)
        qs, ks, vs = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        o = causal_attention(qs, ks, vs, scale=scale)
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's reference backend: (out (total, Hq, D) in q's dtype, lse (Hq, total) float32 in log2 units,
    as the kernels store it; -inf on rows past cu_seqlens[-1])."""
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, H, L, D)
        o, s = padded_forward(qs, ks, vs, scale)
        out[start:end] = o.squeeze(0).transpose(0, 1)
        lse[:, start:end] = s.squeeze(0)
    return out, lse


def backward(d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's reference backward: (dq, dk, dv), causal_attention's reference backward per sequence
    (zero on rows past cu_seqlens[-1])."""
    grads = [torch.zeros_like(x) for x in (q, k, v)]
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        per_seq = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (d_out, q, k, v))  # (1, H, L, D)
        for g, part in zip(grads, padded_backward(*per_seq, scale)):
            g[start:end] = part.squeeze(0).transpose(0, 1)
    return tuple(grads)
