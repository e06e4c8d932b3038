"""Pure-PyTorch fused-linear KL(pi || pi_ref): both lm_head matmuls and the exact KL, chunked over tokens.

Only one (chunk_rows, V) fp32 block of each model's logits exists at a time; the backward recomputes
both blocks and accumulates d(weight) in fp32. Gradients flow to the policy side only.
"""
from __future__ import annotations

import torch

from . import fused_linear_logprobs as fll
from . import kl_divergence as kld
from ._chunks import lm_head_backward, lm_head_chunks


def validate(hidden, weight, ref_hidden, ref_weight, bias, ref_bias, temperature, chunk_size) -> None:
    fll.validate(hidden, weight, None, bias, temperature, 0, chunk_size)
    fll.validate(ref_hidden, ref_weight, None, ref_bias, temperature, 0, chunk_size,
                 names=("ref_hidden", "ref_weight", "targets", "ref_bias"))
    if ref_hidden.shape[0] != hidden.shape[0]:
        raise ValueError(f"ref_hidden must have {hidden.shape[0]} rows (hidden.shape[0]), "
                         f"got shape {tuple(ref_hidden.shape)}")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must have vocab size {weight.shape[0]} (weight.shape[0]), "
                         f"got shape {tuple(ref_weight.shape)}")
    if ref_hidden.dtype != hidden.dtype:
        raise ValueError(f"ref_hidden must have the dtype of hidden ({hidden.dtype}), got {ref_hidden.dtype}")
    if ref_hidden.device != hidden.device:
        raise ValueError(f"ref_hidden is on {ref_hidden.device} but hidden is on {hidden.device}")
    for name, t in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias)):
        if t is not None and t.requires_grad:
            raise ValueError(f"{name} requires grad, but only the policy side (hidden, weight, bias) is "
                             f"differentiated; pass {name}.detach()")


def forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature: float,
            chunk_rows: int | None = None):
    """-> (kl (N,), stats (5, N) = (m_p, log s_p, m_q, log s_q, mean)), fp32 (see kl_divergence.row_stats)."""
    chunks = lm_head_chunks(((hidden, weight, bias), (ref_hidden, ref_weight, ref_bias)), temperature, chunk_rows)
    return kld.kl_over(chunks, hidden.shape[0], hidden.device)


def backward(grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl,
             temperature: float, chunk_rows: int | None = None, need=(True, True, True)):
    """Returns (d hidden, d weight, d bias), None where not needed."""
    chunks = lm_head_chunks(((hidden, weight, bias), (ref_hidden, ref_weight, ref_bias)), temperature, chunk_rows)
    grads = kld.grads_over(chunks, stats, kl, grad_kl, temperature)
    return lm_head_backward(grads, hidden, weight, bias, need)


class _FusedLinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, chunk_rows):
        kl, stats = forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, chunk_rows)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl)
        ctx.args = (temperature, chunk_rows)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl = ctx.saved_tensors
        temperature, chunk_rows = ctx.args
        grads = backward(grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl,
                         temperature, chunk_rows, ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None, None)


def fused_linear_kl_divergence(hidden, weight, ref_hidden, ref_weight, *, bias=None, ref_bias=None,
                               temperature=1.0, chunk_size=None):
    """Reference twin of rlhf_fast.fused_linear_kl_divergence (see its docstring for the contract)."""
    validate(hidden, weight, ref_hidden, ref_weight, bias, ref_bias, temperature, chunk_size)
    return _FusedLinearKL.apply(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, float(temperature),
                                chunk_size)
