"""fused_linear_kl_divergence: exact KL(pi || pi_ref) from both models' hidden states and lm_heads,
never materializing either model's (N, V) logits."""
from __future__ import annotations

import torch

from .. import _backend
from ..reference import fused_linear_kl_divergence as ref
from ..reference import token_logprobs as ref_tl
from ._fused_linear_launch import (cdiv, contig, fake_grads, grads_out, needed_grads, pass_kernel, reduce_tile_configs,
                                  run_backward_slices, split_plan, tile_config, tile_kwargs, tuned_tile)
from ._launch import on_first_tensor_device

_OP = "fused_linear_kl_divergence"


def _cut_args(cutoffs, vocab: int, like):
    """The kernels' view of cutoffs (N, 2) float64: (t (N,) fp32, i (N,) int32 clamped to [0, V]: below 0
    every tie at t is kept, from V none, as for i itself; a NaN i, as in (nan, 0) rows, keeps every tie),
    or placeholders when cutoffs is None."""
    if cutoffs is None:
        return like, like
    index = torch.nan_to_num(cutoffs[:, 1], nan=0.0).clamp(0, vocab).to(torch.int32)
    return cutoffs[:, 0].float().contiguous(), index


@on_first_tensor_device
def _triton_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, cutoffs, targets):
    from ..kernels import fused_linear_kl_divergence as kk
    cfg, prec = tile_config(hidden.dtype, kk.FUSED_FWD_CONFIGS)
    n, vocab, dev = hidden.shape[0], weight.shape[0], hidden.device
    n_zts = 0 if targets is None else 2
    if n == 0:
        empty = torch.empty(0, dtype=torch.float32, device=dev)
        return empty, empty.new_empty(5, 0), empty.new_empty(n_zts, 0)

    def run(cfg):  # one whole launch: what autotuning times, then the launch with the winner
        tiles_per_split, splits = split_plan(n, vocab, cfg, dev)
        part = torch.empty(5 + n_zts, splits, n, dtype=torch.float64, device=dev)
        cut_t, cut_i = _cut_args(cutoffs, vocab, part)
        kk._fused_linear_kl_divergence_fwd_kernel[(cdiv(n, cfg.block_n), splits)](
            hidden, weight, bias if bias is not None else hidden, ref_hidden, ref_weight,
            ref_bias if ref_bias is not None else ref_hidden, cut_t, cut_i,
            targets.long() if targets is not None else part, part, n, vocab, hidden.shape[1], ref_hidden.shape[1],
            hidden.stride(0), weight.stride(0), ref_hidden.stride(0), ref_weight.stride(0), temperature,
            tiles_per_split, int(bias is not None), int(ref_bias is not None), HAS_CUTOFFS=cutoffs is not None,
            HAS_TARGETS=targets is not None, **tile_kwargs(cfg, prec))
        return part
    # with cutoffs or targets the table pick (what the static check compiles with them); else the tuned one
    plain = cutoffs is None and targets is None
    part = run(tuned_tile("fused_linear_kl_fwd", kk.FWD_TUNING_SETS, hidden, vocab, run) if plain else cfg)
    # the splits' row sums are stored and combined in fp64, as the kernel sums them (kernels/kl_divergence.py)
    m_p, s_p, s_d, m_q, s_q = part[:5].double().unbind(0)
    big_p, big_q = m_p.max(0).values, m_q.max(0).values
    scale_p = torch.exp(m_p - big_p)
    sum_p = (s_p * scale_p).sum(0)
    # logs in fp64 too: over a few kept tokens (O(1) log sums, a small KL) fp32 logs put 3 of 12 random
    # seeds over the parity bound (up to 2.2x; N 2, V 3000, 1-3 tokens kept), fp64 logs 1 (the logits' rounding)
    log_s_p = torch.log(sum_p)
    log_s_q = torch.log((s_q * torch.exp(m_q - big_q)).sum(0))
    # re-base each split's s_d from its own maxima to the global ones (see _kl_online_update); a split
    # with no mass on a row (all its tokens off K) has m_p = m_q = -inf there, and adds 0, not 0 * NaN
    shift = s_p * ((m_p - big_p) - (m_q - big_q))
    mean = (scale_p * (s_d + torch.where(s_p == 0, 0.0, shift))).sum(0) / sum_p
    kl = (mean - log_s_p + log_s_q).float()
    # one split holds each target's column, the others add 0
    zts = part[5:].sum(1).float()
    return kl, torch.stack([big_p, log_s_p, big_q, log_s_q, mean]).float(), zts


@on_first_tensor_device
def _triton_backward(grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl,
                     temperature, need, cutoffs):
    from ..kernels import fused_linear_kl_divergence as kk
    cfg, prec = tile_config(hidden.dtype, kk.FUSED_CONFIGS)
    cut_t, cut_i = _cut_args(cutoffs, weight.shape[0], stats)

    def launch(d_x, d_w, d_b, v_begin, v_end, bp):
        kernel, extra = pass_kernel(bp, kk._fused_linear_kl_divergence_bwd_kernel,
                                    kk._fused_linear_kl_divergence_bwd_reduce_kernel)
        kernel[bp.grid](
            hidden, weight, bias if bias is not None else hidden, ref_hidden, ref_weight,
            ref_bias if ref_bias is not None else ref_hidden, cut_t, cut_i, stats, grad_kl, d_x, d_w, d_b,
            hidden.shape[0], weight.shape[0], hidden.shape[1], ref_hidden.shape[1], v_begin, v_end,
            hidden.stride(0), weight.stride(0), ref_hidden.stride(0), ref_weight.stride(0), hidden.shape[1],
            weight.shape[1], temperature, int(bias is not None), int(ref_bias is not None),
            int(bp.need_b), NEED_X=bp.need_x, NEED_W=bp.need_w, HAS_CUTOFFS=cutoffs is not None, **extra,
            **tile_kwargs(bp.cfg, prec))

    return run_backward_slices(launch, hidden, weight, bias, need, cfg,
                               reduce_tile_configs(hidden.dtype, kk.FUSED_REDUCE_CONFIGS),
                               None if cutoffs is not None else
                               ("fused_linear_kl_bwd", kk.BWD_TUNING_SETS, kk.REDUCE_TUNING_SETS))


@torch.library.custom_op("rlhf_fast::fused_linear_kl_divergence_fwd", mutates_args=())
def _fwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ref_hidden: torch.Tensor,
            ref_weight: torch.Tensor, ref_bias: torch.Tensor | None, temperature: float, cutoffs: torch.Tensor | None,
            targets: torch.Tensor | None, ignore_index: int, chunk_size: int,
            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (kl (N,), stats (5, N), logps (2, N) = (logp, ref_logp), or (0, N) without targets), fp32."""
    if targets is not None:
        ref_tl.check_targets_in_range(targets, weight.shape[0], ignore_index)
    if _backend.resolve(_OP, backend, hidden.device, gpu="triton") == "triton":
        kl, stats, zts = _triton_forward(hidden.contiguous(), weight.contiguous(), contig(bias),
                                         ref_hidden.contiguous(), ref_weight.contiguous(), contig(ref_bias),
                                         temperature, cutoffs, contig(targets))
    else:
        kl, stats, zts = ref.forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature,
                                     chunk_size or None, cutoffs, targets, ignore_index)
    if targets is None:
        return kl, stats, zts
    if cutoffs is not None:
        ref.check_targets_kept(zts[0], targets, cutoffs, ignore_index)
    return kl, stats, ref.target_logprobs(zts[0], zts[1], targets, stats, cutoffs, ignore_index)


@_fwd_op.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, cutoffs, targets, ignore_index,
      chunk_size, backend):
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=torch.float32), hidden.new_empty((5, n), dtype=torch.float32),
            hidden.new_empty((0 if targets is None else 2, n), dtype=torch.float32))


@torch.library.custom_op("rlhf_fast::fused_linear_kl_divergence_bwd", mutates_args=())
def _bwd_op(grad_kl: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            ref_hidden: torch.Tensor, ref_weight: torch.Tensor, ref_bias: torch.Tensor | None,
            stats: torch.Tensor, kl: torch.Tensor, temperature: float, cutoffs: torch.Tensor | None, chunk_size: int,
            need: list[bool], backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _backend.resolve(_OP, backend, hidden.device, gpu="triton") == "triton":
        grads = _triton_backward(grad_kl.contiguous(), hidden.contiguous(), weight.contiguous(), contig(bias),
                                 ref_hidden.contiguous(), ref_weight.contiguous(), contig(ref_bias), stats,
                                 kl, temperature, need, cutoffs)
    else:
        grads = ref.backward(grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl,
                             temperature, chunk_size or None, need, cutoffs)
    return grads_out(grads, hidden)


@_bwd_op.register_fake
def _(grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl, temperature, cutoffs,
      chunk_size, need, backend):
    return fake_grads(hidden, weight, bias, need)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, cutoffs, _, _, chunk_size, backend = inputs
    kl, stats, _ = output
    ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl, cutoffs)
    ctx.args = (temperature, chunk_size, backend)


def _backward(ctx, grad_kl, _grad_stats, _grad_logps):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl, cutoffs = ctx.saved_tensors
    temperature, chunk_size, backend = ctx.args
    need = needed_grads(ctx, bias)
    d_h, d_w, d_b = _bwd_op(grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl,
                            temperature, cutoffs, chunk_size, need, backend)
    return (d_h if need[0] else None, d_w if need[1] else None, d_b if need[2] else None,
            None, None, None, None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_kl_divergence(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
                               ref_weight: torch.Tensor, *, bias: torch.Tensor | None = None,
                               ref_bias: torch.Tensor | None = None, temperature: float = 1.0,
                               cutoffs: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                               return_logprobs: bool = False, ignore_index: int = -100,
                               chunk_size: int | None = None, backend: str = "auto"):
    """Exact per-token KL(pi || pi_ref), from hidden states and lm_head weights, over the whole vocab or
    over the sampler's kept set of each token.

    Args:
        hidden: (N, H) float32/bfloat16/float16, the policy's final hidden states.
        weight: (V, H) same dtype (policy lm_head); bias: optional (V,).
        ref_hidden: (N, H_ref) the reference model's hidden states, same dtype as hidden (H_ref may
            differ from H). ref_weight: (V, H_ref), same dtype; ref_bias: optional (V,).
        temperature: > 0, applied to both models' logits.
        cutoffs: optional (N, 2) float64, the sampler's kept sets (``rlhf_fast.sample(...,
            return_cutoffs=True)``): with the policy's x = float32(hidden @ weight.T + bias) / float32(T),
            token v of row n is kept iff ``x[n, v] > t or (x[n, v] == t and v >= i)``, (t, i) =
            cutoffs[n] (t compared as float32). K is decided on the POLICY's logits; both distributions
            are renormalized over K. Rows (-inf, 0) keep every token; a NaN t (the sampler's invalid
            rows) keeps none, so that row's KL (and log-probabilities, and gradient) is NaN: give such
            rows (-inf, 0), or drop them, before summing a loss. Membership is decided on the logits
            recomputed here, which can differ from the rollout's by float32 rounding: only a token
            within rounding of the cut can change sides.
        targets: (N,) int64 (or int32) in [0, V) or ``ignore_index``; only with return_logprobs=True.
            With cutoffs, a target off its row's kept set raises ValueError (decided on the same x the
            kernel compared; during CUDA-graph capture a device-side assert).
        return_logprobs: also return the targets' log-probabilities (below).
        ignore_index: targets equal to it get logp = ref_logp = 0.
        chunk_size: tokens per chunk for the reference backend (Triton tiles on its own).
        backend: "auto" | "triton" | "reference".

    Returns:
        kl: (N,) float32. Without cutoffs, equal to ``kl_divergence(linear(hidden, weight, bias),
        linear(ref_hidden, ref_weight, ref_bias), temperature=T)``, i.e.
        ``(lp.exp() * (lp - lq)).sum(-1)`` with lp, lq the two log_softmax(logits.float() / T). With
        cutoffs, the same with both logits set to -inf off K first (``off`` (N, V) bool, K's complement)::

            x, xr = linear(...).float() / T, linear(ref...).float() / T
            lp = x.masked_fill(off, -inf).log_softmax(-1); lq = xr.masked_fill(off, -inf).log_softmax(-1)
            kl = (lp.exp() * (lp - lq)).masked_fill(off, 0).sum(-1)

        With return_logprobs=True, ``(kl, logp, ref_logp)``: (N,) float32 each, ``lp.gather(-1,
        targets[:, None])[:, 0]`` and the same of lq (0 at ignore_index), computed in the same pass.
        logp and ref_logp carry no gradient: they are returned detached (use fused_linear_logprobs
        to train on the policy's logprob).

    kl is differentiable in hidden, weight and bias (zero gradient off K: membership is a step
    function of the logits). The reference model is a constant: ref_* tensors that require grad raise
    ValueError (pass them detached). The backward recomputes both models' logit blocks (two more
    matmuls), re-deciding K from the same logits, and accumulates d(weight) in fp32.

    Backends: "triton" (both matmuls tiled with tl.dot, logit tiles kept on chip with online
    log-sum-exp for both models, the kept-set test and the target gather done on those tiles (no
    (N, V) tensor; without cutoffs and targets the kernels compile without them), fp32 atomics for
    d(hidden)/d(weight), or no atomics as in fused_linear_logprobs), "reference" (chunked PyTorch).
    """
    ref.check_logprob_args(targets, return_logprobs)
    ref.validate(hidden, weight, ref_hidden, ref_weight, bias, ref_bias, temperature, chunk_size, cutoffs,
                 targets, ignore_index)
    _backend.check_backend_arg(backend)
    kl, _, logps = _fwd_op(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, float(temperature), cutoffs,
                           targets, ignore_index, chunk_size or 0, backend)
    if return_logprobs:
        return kl, logps[0].detach(), logps[1].detach()
    return kl
