"""The pieces of a GPT block, and the three attention layouts they run in.

Every block computes q, k, v with one Linear and hands them to an attention *context* that knows the
layout of the batch and calls the matching rlhf_fast op:

- `Padded`  tokens (B, T): `causal_attention`; with a `KVCache` it also stores k, v for decoding.
- `Packed`  tokens (N,) holding sequences cut by `cu_seqlens`: `causal_attention_varlen`.
- `Decode`  one new token per row (B,): appends k, v to the `KVCache` at each row's own length and
  attends over that row's cache with `decode_attention`.

So the blocks are written once, and the layout is a property of the call, not of the module.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import rlhf_fast

from ..ops._attention_launch import HEAD_DIMS
from .config import GPTConfig


def kernel_head_size(head_size: int) -> int:
    """The attention kernels' head size for `head_size`: the smallest they support that holds it.

    Heads of other sizes (e.g. 24, 80) are zero-padded to it: the zeros add nothing to q @ k^T, and the
    softmax scale stays 1/sqrt(head_size); the padded output columns are dropped.
    """
    for d in HEAD_DIMS:
        if d >= head_size:
            return d
    raise ValueError(f"head size {head_size} is larger than the attention kernels support (max {HEAD_DIMS[-1]})")


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_inv_freq(config: GPTConfig, device=None) -> torch.Tensor:
    """(head_size // 2,) fp32 rotation frequencies of RoPE, after config.rope_scaling.

    "linear" divides every frequency by rope_factor (positions stretched). "llama3" (Llama 3.1) divides
    only the low frequencies: wavelengths longer than original_max / low_freq_factor are divided by
    rope_factor, those shorter than original_max / high_freq_factor are kept, and the band between
    blends the two linearly in original_max / wavelength.
    """
    D = config.head_size
    inv_freq = config.rope_theta ** (-torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    if config.rope_scaling == "linear":
        return inv_freq / config.rope_factor
    if config.rope_scaling == "llama3":
        old, low, high = config.rope_original_max_positions, config.rope_low_freq_factor, config.rope_high_freq_factor
        ratio = old * inv_freq / (2 * math.pi)  # original context length / wavelength
        blend = ((ratio - low) / (high - low)).clamp(0.0, 1.0)  # 0: fully scaled, 1: kept
        return inv_freq / config.rope_factor * (1 - blend) + inv_freq * blend
    return inv_freq


def rope_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape pos.shape + (1, head_size), fp32, broadcasting over the head dim of q and k.

    Computed from `pos` every call (not a buffer) so that model.to(bfloat16) cannot round the frequencies.
    """
    angles = pos.to(torch.float32)[..., None] * inv_freq  # (..., D/2)
    angles = torch.cat((angles, angles), dim=-1)[..., None, :]  # (..., 1, D)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., H, D) by the angles in cos/sin (..., 1, D): the rotate-half (GPT-NeoX / LLaMA) form."""
    x32 = x.to(torch.float32)
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Static key/value buffers for generation; each row's cache starts at slot 0.

    k, v: (n_layer, B, n_kv_head, max_len, kernel_head_size(head_size)); seqlens: (B,) int32, the valid length per row.
    Shapes never change after allocation, so decode steps can be captured in a CUDA graph.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype: torch.dtype):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, kernel_head_size(config.head_size))
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.seqlens = torch.zeros(batch_size, device=device, dtype=torch.int32)
        self.rows = torch.arange(batch_size, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class Padded:
    """(B, T) batches whose pads, if any, sit after each row's real tokens (causal queries never see them)."""

    def __init__(self, backend: str, cache: KVCache | None = None):
        self.backend, self.cache = backend, cache

    def __call__(self, layer: int, q, k, v, scale: float):  # q (B, T, Hq, D), k/v (B, T, Hkv, D)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if self.cache is not None:
            T = k.shape[2]
            self.cache.k[layer, :, :, :T] = k
            self.cache.v[layer, :, :, :T] = v
        y = rlhf_fast.causal_attention(q, k, v, scale=scale, backend=self.backend)  # (B, Hq, T, D)
        return y.transpose(1, 2)  # (B, T, Hq, D)


class Packed:
    """(N,) tokens of several sequences laid end to end; sequence i is rows cu_seqlens[i]:cu_seqlens[i+1]."""

    def __init__(self, backend: str, cu_seqlens: torch.Tensor, max_seqlen: int):
        self.backend, self.cu_seqlens, self.max_seqlen = backend, cu_seqlens, max_seqlen

    def __call__(self, layer: int, q, k, v, scale: float):  # q (N, Hq, D), k/v (N, Hkv, D)
        return rlhf_fast.causal_attention_varlen(q, k, v, self.cu_seqlens, self.max_seqlen, scale=scale,
                                                 backend=self.backend)  # (N, Hq, D)


class Decode:
    """One new token per row: write its k, v at slot cache.seqlens[b], attend over slots 0..seqlens[b]."""

    def __init__(self, backend: str, cache: KVCache):
        self.backend, self.cache = backend, cache
        self.lengths = cache.seqlens + 1  # (B,) int32, lengths including the new token

    def __call__(self, layer: int, q, k, v, scale: float):  # q (B, Hq, D), k/v (B, Hkv, D)
        cache = self.cache
        slot = cache.seqlens.long()
        cache.k[layer][cache.rows, :, slot] = k.to(cache.k.dtype)  # (B, Hkv, D) into (B, Hkv, Tmax, D)
        cache.v[layer][cache.rows, :, slot] = v.to(cache.v.dtype)
        return rlhf_fast.decode_attention(q.to(cache.k.dtype), cache.k[layer], cache.v[layer], self.lengths,
                                          scale=scale, backend=self.backend)  # (B, Hq, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.n_kv_head, config.head_size
        # q, k, v in one matmul: GPT-2's c_attn when n_kv_head == n_head
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_size,
                                bias=config.has_qkv_bias)
        self.c_proj = nn.Linear(config.n_head * config.head_size, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, layer: int, attend, rope=None, keep=None):  # x (..., C): (B, T, C), (N, C) or (B, C)
        """keep: optional (M,) flat indices into x's positions: attention still runs over every position
        (they are all keys and values), the output projection only for these rows -> (M, C)."""
        lead = x.shape[:-1]
        D = self.head_size
        q, k, v = self.c_attn(x).split([self.n_head * D, self.n_kv_head * D, self.n_kv_head * D], dim=-1)
        q = q.view(*lead, self.n_head, D)  # (..., Hq, D)
        k = k.view(*lead, self.n_kv_head, D)  # (..., Hkv, D)
        v = v.view(*lead, self.n_kv_head, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        pad = kernel_head_size(D) - D
        if pad:
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))  # (..., H, kernel_head_size)
        y = attend(layer, q, k, v, D ** -0.5)  # (..., Hq, D + pad)
        if pad:
            y = y[..., :D]
        y = y.reshape(*lead, self.n_head * D).to(x.dtype)  # (..., Hq * D)
        if keep is not None:
            y = y.reshape(-1, y.shape[-1])[keep]  # (M, Hq * D)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = config.mlp_hidden
        # SwiGLU packs its gate and up projections into c_fc: (C, 2 * hidden)
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, layer: int, attend, rope=None, keep=None):
        """x (..., C) -> (..., C), or with keep ((M,) flat indices into x's positions) those rows only (M, C)."""
        a = self.attn(self.ln_1(x), layer, attend, rope, keep)
        if keep is not None:
            x = x.reshape(-1, x.shape[-1])[keep]
        x = x + a
        return x + self.mlp(self.ln_2(x))


def init_weights(module: nn.Module, config: GPTConfig) -> None:
    """GPT-2's init: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layer)."""
    for name, p in module.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))
        elif p.dim() >= 2:
            nn.init.normal_(p, std=0.02)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.ones_(p)
