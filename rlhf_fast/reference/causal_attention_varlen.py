"""Packed-sequence causal attention in plain PyTorch: the CPU path and test oracle of `causal_attention_varlen`."""
from __future__ import annotations

import torch

from .causal_attention import causal_attention


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
