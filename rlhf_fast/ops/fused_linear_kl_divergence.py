"""fused_linear_kl_divergence: exact KL(pi || pi_ref) from both models' hidden states and lm_heads,
never materializing either model's (N, V) logits."""
from __future__ import annotations

import torch

from .. import _backend
from ..reference import fused_linear_kl_divergence as ref
from ._fused_linear_launch import (cdiv, contig, fake_grads, grads_out, needed_grads, pass_kernel, reduce_tile_configs,
                                  run_backward_slices, split_plan, tile_config, tile_kwargs, tuned_tile)
from ._launch import on_first_tensor_device

_OP = "fused_linear_kl_divergence"


@on_first_tensor_device
def _triton_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature):
    from ..kernels import fused_linear_kl_divergence as kk
    cfg, prec = tile_config(hidden.dtype, kk.FUSED_FWD_CONFIGS)
    n, vocab, dev = hidden.shape[0], weight.shape[0], hidden.device
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=dev), torch.empty(5, 0, dtype=torch.float32, device=dev)

    def run(cfg):  # one whole launch: what autotuning times, then the launch with the winner
        tiles_per_split, splits = split_plan(n, vocab, cfg, dev)
        part = torch.empty(5, splits, n, dtype=torch.float32, device=dev)
        kk._fused_linear_kl_divergence_fwd_kernel[(cdiv(n, cfg.block_n), splits)](
            hidden, weight, bias if bias is not None else hidden, ref_hidden, ref_weight,
            ref_bias if ref_bias is not None else ref_hidden, part, n, vocab, hidden.shape[1], ref_hidden.shape[1],
            hidden.stride(0), weight.stride(0), ref_hidden.stride(0), ref_weight.stride(0), temperature,
            tiles_per_split, int(bias is not None), int(ref_bias is not None), **tile_kwargs(cfg, prec))
        return part
    part = run(tuned_tile("fused_linear_kl_fwd", kk.FWD_TUNING_SETS, hidden, vocab, run))
    # the splits' row sums are combined in fp64, as the kernel sums them (see kernels/kl_divergence.py)
    m_p, s_p, s_d, m_q, s_q = part.double().unbind(0)
    big_p, big_q = m_p.max(0).values, m_q.max(0).values
    scale_p = torch.exp(m_p - big_p)
    sum_p = (s_p * scale_p).sum(0)
    log_s_p = torch.log(sum_p.float())
    log_s_q = torch.log((s_q * torch.exp(m_q - big_q)).sum(0).float())
    # re-base each split's s_d from its own maxima to the global ones (see _kl_online_update)
    mean = (scale_p * (s_d + s_p * ((m_p - big_p) - (m_q - big_q)))).sum(0) / sum_p
    kl = (mean - log_s_p + log_s_q).float()
    return kl, torch.stack([big_p.float(), log_s_p, big_q.float(), log_s_q, mean.float()])


@on_first_tensor_device
def _triton_backward(grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl,
                     temperature, need):
    from ..kernels import fused_linear_kl_divergence as kk
    cfg, prec = tile_config(hidden.dtype, kk.FUSED_CONFIGS)

    def launch(d_x, d_w, d_b, v_begin, v_end, bp):
        kernel, extra = pass_kernel(bp, kk._fused_linear_kl_divergence_bwd_kernel,
                                    kk._fused_linear_kl_divergence_bwd_reduce_kernel)
        kernel[bp.grid](
            hidden, weight, bias if bias is not None else hidden, ref_hidden, ref_weight,
            ref_bias if ref_bias is not None else ref_hidden, stats, grad_kl, d_x, d_w, d_b,
            hidden.shape[0], weight.shape[0], hidden.shape[1], ref_hidden.shape[1], v_begin, v_end,
            hidden.stride(0), weight.stride(0), ref_hidden.stride(0), ref_weight.stride(0), hidden.shape[1],
            weight.shape[1], temperature, int(bias is not None), int(ref_bias is not None),
            int(bp.need_b), NEED_X=bp.need_x, NEED_W=bp.need_w, **extra, **tile_kwargs(bp.cfg, prec))

    return run_backward_slices(launch, hidden, weight, bias, need, cfg,
                               reduce_tile_configs(hidden.dtype, kk.FUSED_REDUCE_CONFIGS),
                               ("fused_linear_kl_bwd", kk.BWD_TUNING_SETS, kk.REDUCE_TUNING_SETS))


@torch.library.custom_op("rlhf_fast::fused_linear_kl_divergence_fwd", mutates_args=())
def _fwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ref_hidden: torch.Tensor,
            ref_weight: torch.Tensor, ref_bias: torch.Tensor | None, temperature: float, chunk_size: int,
            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if _backend.resolve(_OP, backend, hidden.device, gpu="triton") == "triton":
        return _triton_forward(hidden.contiguous(), weight.contiguous(), contig(bias), ref_hidden.contiguous(),
                               ref_weight.contiguous(), contig(ref_bias), temperature)
    return ref.forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, chunk_size or None)


@_fwd_op.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, chunk_size, backend):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty((5, n), dtype=torch.float32)


@torch.library.custom_op("rlhf_fast::fused_linear_kl_divergence_bwd", mutates_args=())
def _bwd_op(grad_kl: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            ref_hidden: torch.Tensor, ref_weight: torch.Tensor, ref_bias: torch.Tensor | None,
            stats: torch.Tensor, kl: torch.Tensor, temperature: float, chunk_size: int,
            need: list[bool], backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _backend.resolve(_OP, backend, hidden.device, gpu="triton") == "triton":
        grads = _triton_backward(grad_kl.contiguous(), hidden.contiguous(), weight.contiguous(), contig(bias),
                                 ref_hidden.contiguous(), ref_weight.contiguous(), contig(ref_bias), stats,
                                 kl, temperature, need)
    else:
        grads = ref.backward(grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl,
                             temperature, chunk_size or None, need)
    return grads_out(grads, hidden)


@_bwd_op.register_fake
def _(grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl, temperature,
      chunk_size, need, backend):
    return fake_grads(hidden, weight, bias, need)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, chunk_size, backend = inputs
    kl, stats = output
    ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl)
    ctx.args = (temperature, chunk_size, backend)


def _backward(ctx, grad_kl, _grad_stats):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl = ctx.saved_tensors
    temperature, chunk_size, backend = ctx.args
    need = needed_grads(ctx, bias)
    d_h, d_w, d_b = _bwd_op(grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl,
                            temperature, chunk_size, need, backend)
    return (d_h if need[0] else None, d_w if need[1] else None, d_b if need[2] else None,
            None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_kl_divergence(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
                               ref_weight: torch.Tensor, *, bias: torch.Tensor | None = None,
                               ref_bias: torch.Tensor | None = None, temperature: float = 1.0,
                               chunk_size: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Exact per-token KL(pi || pi_ref) over the whole vocab, from hidden states and lm_head weights.

    Args:
        hidden: (N, H) float32/bfloat16/float16, the policy's final hidden states.
        weight: (V, H) same dtype (policy lm_head); bias: optional (V,).
        ref_hidden: (N, H_ref) the reference model's hidden states, same dtype as hidden (H_ref may
            differ from H). ref_weight: (V, H_ref), same dtype; ref_bias: optional (V,).
        temperature: > 0, applied to both models' logits.
        chunk_size: tokens per chunk for the reference backend (Triton tiles on its own).
        backend: "auto" | "triton" | "reference".

    Returns:
        (N,) float32, equal to ``kl_divergence(linear(hidden, weight, bias), linear(ref_hidden,
        ref_weight, ref_bias), temperature=T)``, i.e.
        ``(lp.exp() * (lp - lq)).sum(-1)`` with lp, lq the two log_softmax(logits.float() / T).

    Differentiable in hidden, weight and bias. The reference model is a constant: ref_* tensors that
    require grad raise ValueError (pass them detached). The backward recomputes both models' logit
    blocks (two more matmuls) and accumulates d(weight) in fp32.

    Backends: "triton" (both matmuls tiled with tl.dot, logit tiles kept on chip with online
    log-sum-exp for both models, fp32 atomics for d(hidden)/d(weight), or no atomics as in
    fused_linear_logprobs), "reference" (chunked PyTorch).
    """
    ref.validate(hidden, weight, ref_hidden, ref_weight, bias, ref_bias, temperature, chunk_size)
    _backend.check_backend_arg(backend)
    kl, _ = _fwd_op(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, float(temperature),
                       chunk_size or 0, backend)
    return kl
