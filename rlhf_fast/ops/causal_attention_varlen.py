"""causal_attention_varlen: fused causal attention over packed sequences of uneven lengths (no padding).

Kernels: kernels/causal_attention_varlen.py (launched through rlhf_fast/ops/_attention_launch.py, shared
with causal_attention); reference: rlhf_fast/reference/causal_attention_varlen.py.
"""
from __future__ import annotations

import torch

from .. import _backend, _validate
from ..reference import causal_attention_varlen as _ref
from . import _attention_launch as _launch

_OP = "causal_attention_varlen"


@torch.library.custom_op("rlhf_fast::causal_attention_varlen_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
         scale: float, deterministic: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    end = _launch.check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0])
    if _backend.resolve(_OP, backend, q.device, gpu="triton") == "reference":
        out, lse = _ref.forward(q, k, v, cu_seqlens, scale)
        return _launch.empty_like_unit_last(q).copy_(out), lse
    return _launch.attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale, packed_end=end)


@_fwd.register_fake
def _fwd_fake(q, k, v, cu_seqlens, max_seqlen, scale, deterministic, backend):
    lse = q.new_empty(_launch.lse_shape(q, packed=True), dtype=torch.float32)
    return _launch.empty_like_unit_last(q), lse


@torch.library.custom_op("rlhf_fast::causal_attention_varlen_bwd", mutates_args=())
def _bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
         lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float,
         deterministic: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _backend.resolve(_OP, backend, q.device, gpu="triton") == "reference":
        grads = _ref.backward(do, q, k, v, cu_seqlens, scale)
        return tuple(_launch.empty_like_unit_last(t).copy_(g) for t, g in zip((q, k, v), grads))
    return _launch.attention_bwd(do, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, deterministic)


@_bwd.register_fake
def _bwd_fake(do, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, deterministic, backend):
    return tuple(_launch.empty_like_unit_last(t) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, deterministic, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale, ctx.deterministic, ctx.backend = max_seqlen, scale, deterministic, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _bwd(d_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale, ctx.deterministic,
                      ctx.backend)
    return dq, dk, dv, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def causal_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_seqlen: int, *, scale: float | None = None, deterministic: bool = False,
                            backend: str = "auto") -> torch.Tensor:
    """Causal attention over packed sequences, each blind to the others; differentiable in q, k and v.

    Args:
        q: (total, Hq, D) fp16, bf16 or fp32: the sequences' tokens concatenated (as flash_attn_varlen_func).
        k, v: (total, Hkv, D), q's dtype and device, Hq % Hkv == 0.
        cu_seqlens: int32 (n + 1,) on q's device: 0, then running totals of the n sequence lengths
            (non-decreasing; empty sequences allowed). Rows past cu_seqlens[-1] get output 0.
        max_seqlen: an int >= the longest sequence (sizes the launch grid).
        scale: multiplier of q @ k^T; default 1 / sqrt(D).
        deterministic: dQ by a separate pass instead of fp32 atomics (bitwise reproducible gradients).
        backend: "auto" (Triton on CUDA tensors, the reference on CPU tensors), "triton" or "reference".

    Returns:
        (total, Hq, D) in q's dtype. For each sequence i with s, e = cu_seqlens[i], cu_seqlens[i+1]:
        ``out[s:e] = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
        v[s:e].transpose(0, 1), is_causal=True, enable_gqa=True, scale=scale).transpose(0, 1)``.
        The values of cu_seqlens are checked on the host: one device sync the first time a tensor is
        seen, none when the same unmodified tensor comes again (as it does for every layer of a model).
    """
    _launch.check_qkv(q, k, v, token_dim=0, ndim=3)
    _validate.check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
    _validate.check_same_device(q=q, cu_seqlens=cu_seqlens)
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must hold at least one entry (0), got an empty tensor")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    scale = _launch.default_scale(scale, q.shape[-1])
    _backend.check_backend_arg(backend)
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    return _fwd(q, k, v, cu_seqlens, max_seqlen, scale, deterministic, backend)[0]
