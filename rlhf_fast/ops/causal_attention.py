"""causal_attention: fused causal self-attention (FlashAttention-2 forward and backward), MHA/GQA/MQA.

Kernels: kernels/causal_attention.py (launched through rlhf_fast/ops/_attention_launch.py, configs and
tuning sets in kernels/_attention_configs.py); reference: rlhf_fast/reference/causal_attention.py.
"""
from __future__ import annotations

import torch

from .. import _backend
from ..reference import causal_attention as _ref
from . import _attention_launch as _launch

_OP = "causal_attention"


@torch.library.custom_op("rlhf_fast::causal_attention_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, deterministic: bool,
         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if _backend.resolve(_OP, backend, q.device, gpu="triton") == "reference":
        out, lse = _ref.forward(q, k, v, scale)
        return _launch.empty_like_unit_last(q).copy_(out), lse
    return _launch.attention_fwd(q, k, v, None, q.shape[2], scale)


@_fwd.register_fake
def _fwd_fake(q, k, v, scale, deterministic, backend):
    lse = q.new_empty(_launch.lse_shape(q, packed=False), dtype=torch.float32)
    return _launch.empty_like_unit_last(q), lse


@torch.library.custom_op("rlhf_fast::causal_attention_bwd", mutates_args=())
def _bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
         lse: torch.Tensor, scale: float, deterministic: bool,
         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _backend.resolve(_OP, backend, q.device, gpu="triton") == "reference":
        grads = _ref.backward(do, q, k, v, scale, out, lse)
        return tuple(_launch.empty_like_unit_last(t).copy_(g) for t, g in zip((q, k, v), grads))
    return _launch.attention_bwd(do, q, k, v, out, lse, None, q.shape[2], scale, deterministic)


@_bwd.register_fake
def _bwd_fake(do, q, k, v, out, lse, scale, deterministic, backend):
    return tuple(_launch.empty_like_unit_last(t) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, scale, deterministic, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.deterministic, ctx.backend = scale, deterministic, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _bwd(d_out, q, k, v, out, lse, ctx.scale, ctx.deterministic, ctx.backend)
    return dq, dk, dv, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                     deterministic: bool = False, backend: str = "auto") -> torch.Tensor:
    """Causal scaled-dot-product attention with grouped KV heads, differentiable in q, k and v.

    Args:
        q: (B, Hq, T, D) fp16, bf16 or fp32. Any strides with a unit last-dim stride are read in place
            (e.g. a (B, T, H, D) tensor viewed through ``.transpose(1, 2)``); others are copied once.
        k, v: (B, Hkv, T, D), q's dtype and device, Hq % Hkv == 0 (MHA Hkv == Hq, GQA, MQA Hkv == 1).
        scale: multiplier of q @ k^T; default 1 / sqrt(D).
        deterministic: compute dQ in a separate pass instead of with fp32 atomics, so gradients are
            bitwise reproducible (also forced by ``torch.use_deterministic_algorithms(True)``).
        backend: "auto" (Triton on CUDA tensors, the reference on CPU tensors), "triton" or "reference".

    Returns:
        (B, Hq, T, D) in q's dtype, laid out like q. Equivalent to
        ``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=scale)``.
        T may be any length >= 1; D one of 16, 32, 64, 128, 256. The Triton path accumulates in fp32,
        keeps the row log-sum-exp in fp32 for the backward, and never loads blocks above the diagonal.
    """
    _launch.check_qkv(q, k, v, token_dim=2, ndim=4)
    scale = _launch.default_scale(scale, q.shape[-1])
    _backend.check_backend_arg(backend)
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    return _fwd(q, k, v, scale, deterministic, backend)[0]
