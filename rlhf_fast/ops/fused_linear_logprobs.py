"""fused_linear_logprobs: lm_head matmul + per-token logprob/entropy without materializing (N, V) logits."""
from __future__ import annotations

import torch

from .. import _backend
from ..reference import fused_linear_logprobs as ref
from ..reference import token_logprobs as ref_tl
from ._fused_linear_launch import (cdiv, contig, fake_grads, grads_out, needed_grads, pass_kernel, reduce_tile_configs,
                                  run_backward_slices, split_plan, tile_config, tile_kwargs, tuned_tile)
from ._launch import on_first_tensor_device

_OP = "fused_linear_logprobs"


@on_first_tensor_device
def _triton_forward(hidden, weight, bias, targets, temperature, want_entropy, ignore_index, cutoffs):
    from ..kernels import fused_linear_logprobs as k
    cfg, prec = tile_config(hidden.dtype, k.CONFIGS)
    n, vocab, dev = hidden.shape[0], weight.shape[0], hidden.device
    if n == 0:
        e = torch.empty(0, dtype=torch.float32, device=dev)
        return e, e.clone(), torch.empty(2, 0, dtype=torch.float32, device=dev)
    cut_t, cut_i = _cut_args(cutoffs, vocab, hidden)

    def run(cfg):  # one whole launch: what autotuning times, then the launch with the winner
        tiles_per_split, splits = split_plan(n, vocab, cfg, dev)
        part = torch.empty(4, splits, n, dtype=torch.float32, device=dev)
        k._fused_linear_logprobs_fwd_kernel[(cdiv(n, cfg.block_n), splits)](
            hidden, weight, bias if bias is not None else hidden, targets, cut_t if cutoffs is not None else part,
            cut_i if cutoffs is not None else part, part, n, vocab, hidden.shape[1], hidden.stride(0),
            weight.stride(0), temperature, ignore_index, tiles_per_split, int(bias is not None), int(want_entropy),
            HAS_CUTOFFS=cutoffs is not None, **tile_kwargs(cfg, prec))
        return part
    # with cutoffs the table pick (what the static check compiles with HAS_CUTOFFS); without, the tuned one
    part = run(tuned_tile("fused_linear_logprobs_fwd", k.FWD_TUNING_SETS, hidden, vocab, run) if cutoffs is None
               else cfg)
    m, s, sy, zt = part.unbind(0)
    big_m = m.max(0).values
    scale = torch.exp(m - big_m)
    total = (s * scale).sum(0)
    log_total = torch.log(total)
    valid = targets != ignore_index
    zt = zt.sum(0)
    logp = (zt - big_m) - log_total
    if cutoffs is not None:  # a target off the kept set: -inf, also in a row that keeps nothing (NaN stats)
        logp = torch.where(zt == float("-inf"), float("-inf"), logp)
    logp = torch.where(valid, logp, 0.0)
    entropy = log_total.new_empty(0)
    if want_entropy:
        # sum exp(z - M) (z - M) over all splits; a split whose tiles the cutoffs emptied (s = 0) adds 0
        shift = (m - big_m) * s if cutoffs is None else torch.where(s > 0, (m - big_m) * s, 0.0)
        total_y = (scale * (sy + shift)).sum(0)
        entropy = torch.where(valid, log_total - total_y / total, 0.0)
    stats = torch.stack([big_m, log_total])
    if cutoffs is not None:  # a row that keeps nothing: finite stats, so the backward's p is 0, not NaN
        stats = torch.where(big_m == float("-inf"), 0.0, stats)
    return logp, entropy, stats


@on_first_tensor_device
def _triton_backward(grad_logp, grad_entropy, hidden, weight, bias, targets, stats, entropy, temperature,
                     ignore_index, need, cutoffs):
    from ..kernels import fused_linear_logprobs as k
    cfg, prec = tile_config(hidden.dtype, k.CONFIGS)
    have_ent = grad_entropy is not None
    cut_t, cut_i = _cut_args(cutoffs, weight.shape[0], stats)

    def launch(d_x, d_w, d_b, v_begin, v_end, bp):
        kernel, extra = pass_kernel(bp, k._fused_linear_logprobs_bwd_kernel,
                                    k._fused_linear_logprobs_bwd_reduce_kernel)
        kernel[bp.grid](
            hidden, weight, bias if bias is not None else hidden, targets, cut_t, cut_i, stats,
            entropy if have_ent else stats, grad_logp, grad_entropy if have_ent else grad_logp, d_x, d_w, d_b,
            hidden.shape[0], weight.shape[0], hidden.shape[1], v_begin, v_end, hidden.stride(0), weight.stride(0),
            hidden.shape[1], weight.shape[1], temperature, ignore_index, int(bias is not None), int(have_ent),
            int(bp.need_b), NEED_X=bp.need_x, NEED_W=bp.need_w, HAS_CUTOFFS=cutoffs is not None, **extra,
            **tile_kwargs(bp.cfg, prec))

    return run_backward_slices(launch, hidden, weight, bias, need, cfg,
                               reduce_tile_configs(hidden.dtype, k.REDUCE_CONFIGS),
                               None if cutoffs is not None else
                               ("fused_linear_logprobs_bwd", k.BWD_TUNING_SETS, k.REDUCE_TUNING_SETS))


def _cut_args(cutoffs, vocab, dummy):
    """The kernels' (threshold fp32 (N,), index int32 (N,)) pointers; `dummy` twice without cutoffs."""
    return (dummy, dummy) if cutoffs is None else ref_tl.cut_points(cutoffs, vocab)


@torch.library.custom_op("rlhf_fast::fused_linear_logprobs_fwd", mutates_args=())
def _fwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
            temperature: float, want_entropy: bool, ignore_index: int, chunk_size: int,
            cutoffs: torch.Tensor | None, backend: str,
            check_kept: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ref_tl.check_targets_in_range(targets, weight.shape[0], ignore_index)
    chosen = _backend.resolve(_OP, backend, hidden.device, gpu="triton")
    if chosen == "triton":
        out = _triton_forward(hidden.contiguous(), weight.contiguous(), contig(bias), targets.long().contiguous(),
                              temperature, want_entropy, ignore_index, cutoffs)
    else:
        out = ref.forward(hidden, weight, bias, targets, temperature, want_entropy, ignore_index,
                          chunk_size or None, cutoffs)
    if cutoffs is not None and check_kept:
        ref_tl.check_targets_kept(out[0], targets, ignore_index)
    return out


@_fwd_op.register_fake
def _(hidden, weight, bias, targets, temperature, want_entropy, ignore_index, chunk_size, cutoffs, backend,
      check_kept=True):
    n = hidden.shape[0]
    new = lambda *m: hidden.new_empty(m, dtype=torch.float32)  # noqa: E731
    return new(n), new(n if want_entropy else 0), new(2, n)


@torch.library.custom_op("rlhf_fast::fused_linear_logprobs_bwd", mutates_args=())
def _bwd_op(grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, hidden: torch.Tensor,
            weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, stats: torch.Tensor,
            entropy: torch.Tensor, temperature: float, ignore_index: int, chunk_size: int,
            need: list[bool], cutoffs: torch.Tensor | None,
            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen = _backend.resolve(_OP, backend, hidden.device, gpu="triton")
    if chosen == "triton":
        grads = _triton_backward(grad_logp.contiguous(), None if grad_entropy is None else grad_entropy.contiguous(),
                                 hidden.contiguous(), weight.contiguous(), contig(bias), targets.long().contiguous(),
                                 stats, entropy, temperature, ignore_index, need, cutoffs)
    else:
        grads = ref.backward(grad_logp, grad_entropy, hidden, weight, bias, targets, stats, entropy, temperature,
                             ignore_index, chunk_size or None, need, cutoffs)
    return grads_out(grads, hidden)


@_bwd_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, targets, stats, entropy, temperature, ignore_index,
      chunk_size, need, cutoffs, backend):
    return fake_grads(hidden, weight, bias, need)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, want_entropy, ignore_index, chunk_size, cutoffs, backend, _ = inputs
    logp, entropy, stats = output
    ctx.save_for_backward(hidden, weight, bias, targets, stats, entropy, cutoffs,
                          logp if cutoffs is not None else None)
    ctx.args = (temperature, want_entropy, ignore_index, chunk_size, backend)


def _backward(ctx, grad_logp, grad_entropy, _grad_stats):
    hidden, weight, bias, targets, stats, entropy, cutoffs, logp = ctx.saved_tensors
    temperature, want_entropy, ignore_index, chunk_size, backend = ctx.args
    need = needed_grads(ctx, bias)
    if grad_logp is None:
        grad_logp = torch.zeros_like(stats[0])
    elif cutoffs is not None:  # a target off its kept set (check_kept=False): logp is the constant -inf
        grad_logp = grad_logp.masked_fill(logp.isneginf(), 0.0)
    d_h, d_w, d_b = _bwd_op(grad_logp, grad_entropy if want_entropy else None, hidden, weight, bias, targets,
                            stats, entropy, temperature, ignore_index, chunk_size, need, cutoffs, backend)
    return (d_h if need[0] else None, d_w if need[1] else None, d_b if need[2] else None,
            None, None, None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          return_entropy: bool = False, ignore_index: int = -100,
                          chunk_size: int | None = None, cutoffs: torch.Tensor | None = None,
                          check_kept: bool = True, backend: str = "auto"):
    """Per-token log pi(target) (and entropy) of ``hidden @ weight.T + bias``, never holding (N, V) logits.

    Args:
        hidden: (N, H) float32, bfloat16 or float16 (the final hidden states, flattened over batch/time).
        weight: (V, H), same dtype (the lm_head weight). bias: optional (V,), same dtype.
        targets: (N,) int64 (or int32) in [0, V), or ``ignore_index``.
        temperature: > 0; the distribution is softmax(logits / temperature).
        return_entropy: also return the entropy of that distribution.
        ignore_index: targets equal to it give logp = entropy = 0 and no gradient.
        cutoffs: None (the full distribution), or (N, 2) float64 on hidden's device: each token's kept set
            as ``rlhf_fast.sample(..., return_cutoffs=True)`` returns it, with x = logits / temperature
            in float32 (see ``token_logprobs``); logp and entropy are then those of the kept,
            renormalized distribution and d(logits) = 0 off the kept set. A target off its kept set raises
            ValueError (the kernels give it -inf); membership is decided on this op's x, which can differ
            from the sampler's logits by float32 rounding, so a logit within rounding of the cut may fall
            on the other side.
        check_kept: with cutoffs, whether a target off its kept set raises; False returns logp = -inf
            there (entropy as usual, a finite gradient), for a caller that handles it (an RL update whose
            policy has moved since the rollout: the drawn token may have left the set).
        chunk_size: tokens per chunk for the reference backend (default: so that one (chunk, V) fp32
            block is 32 MiB). The Triton backend tiles on its own and ignores it.
        backend: "auto" | "triton" | "reference".

    Returns:
        logp (N,) float32, or (logp, entropy). Equal to
        ``token_logprobs(hidden @ weight.T + bias, targets, temperature=...)``, i.e.::

            z = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
            logp = z.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)

    Differentiable in hidden, weight and bias. The backward recomputes logits block by block (one more
    matmul than the naive path) and accumulates d(weight) in fp32.

    Backends: "triton" tiles the matmul with tl.dot, keeps each (BLOCK_N, BLOCK_V) logit tile on chip
    with an online log-sum-exp, and in the backward adds d(hidden) and d(weight) tile products with
    fp32 atomics, or without atomics (bitwise reproducible, one more matmul) under
    ``torch.use_deterministic_algorithms(True)`` or ``RLHF_FAST_FUSED_LINEAR_BWD=reduce``;
    "reference" is chunked PyTorch (peak extra memory ~ chunk_size x V x 4 bytes, plus a (V, H) fp32
    d(weight) accumulator when weight is not fp32). "auto": Triton on CUDA, reference on CPU.
    """
    ref.validate(hidden, weight, targets, bias, temperature, ignore_index, chunk_size, cutoffs=cutoffs)
    _backend.check_backend_arg(backend)
    logp, entropy, _ = _fwd_op(hidden, weight, bias, targets, float(temperature), bool(return_entropy),
                               ignore_index, chunk_size or 0, cutoffs, backend, bool(check_kept))
    return (logp, entropy) if return_entropy else logp
