"""fused_linear_token_loss: a per-token loss of the lm_head's logprobs, with its gradient taken in the forward.

`fused_linear_logprobs` cannot know, in its forward, the gradient that will flow back into its per-token
logprobs, so its backward recomputes the logits (4 (N, H, V) matmuls in all, where the unfused path's
saved (N, V) softmax needs 3). A training loss is different: the loss of a token is a function of that
token's logprob (and entropy) and of constants (old logprobs, advantages, mask, the batch's denominator),
so its gradient is known as soon as the row's statistics are. This composite takes the loss as a
function and computes, chunk by chunk of rows, the logits, the loss and d(logits) together, as
Liger-Kernel's fused linear losses do: 3 matmuls and one (chunk, V) block of memory. Given a reference
model's hidden states and lm_head, the exact per-token KL(pi || pi_ref) joins the statistics the loss
sees: 4 matmuls where `fused_linear_kl_divergence` forward + backward take 6.

It is a composite, not an op: `loss_fn` is a Python callable, which no torch.library schema can carry, so
it runs eagerly (no torch.compile graph) and dispatches at the Python level:
- reference backend (CPU default), no cutoffs: the one-pass loop above
  (`reference.fused_linear_logprobs.forward_with_loss`);
- otherwise (Triton on GPU, or cutoffs): `rlhf_fast.fused_linear_logprobs` forward and its backward,
  both run inside this forward with the gradient that `loss_fn` gives (the op's kernels never build
  (N, V) logits; 4 matmul-equivalents, as the op's own backward).
"""
from __future__ import annotations

from typing import Callable

import torch

from . import _backend
from .reference import fused_linear_kl_divergence as ref_kl
from .reference import fused_linear_logprobs as ref
from .reference import token_logprobs as ref_tl
from .reference._chunks import row_chunks
from .reference.fused_linear_logprobs import TokenStats

_OP = "fused_linear_token_loss"

LossFn = Callable[[slice, TokenStats], torch.Tensor]


def fused_linear_token_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, *,
                            bias: torch.Tensor | None = None, ref_hidden: torch.Tensor | None = None,
                            ref_weight: torch.Tensor | None = None, ref_bias: torch.Tensor | None = None,
                            temperature: float = 1.0, return_entropy: bool = False, ignore_index: int = -100,
                            cutoffs: torch.Tensor | None = None, check_kept: bool = True,
                            chunk_size: int | None = None, backend: str = "auto"):
    """loss = sum over chunks of rows of loss_fn(rows, TokenStats(logp[rows], entropy[rows], kl[rows])), with
    logp, entropy = fused_linear_logprobs(hidden, weight, targets, ...) and
    kl = fused_linear_kl_divergence(hidden, weight, ref_hidden, ref_weight, ...) (when a reference is
    given), and the gradients computed in the forward: ``loss.backward()`` only scales them.

    Args:
        hidden: (N, H) fp32/bf16/fp16; weight: (V, H) same dtype; targets: (N,) int64/int32 in [0, V) or
            ignore_index; bias, temperature, ignore_index, cutoffs: as in ``fused_linear_logprobs``.
        loss_fn: ``loss_fn(rows, stats) -> 0-dim tensor``: the loss of the rows ``rows`` (a slice of
            range(N)) given their statistics ``stats.logp``, ``stats.entropy`` (None unless
            return_entropy) and ``stats.kl`` (None without a reference), fp32 (n,) tensors. It must be a
            sum over those rows of terms that depend on their own statistics only, plus constants: e.g.
            ``-(adv[rows] * (stats.logp - old[rows]).exp() * w[rows]).sum()``. Tensors it reads other than
            the statistics receive no gradient. Ignored rows (targets == ignore_index) have statistics 0
            and get no gradient, whatever loss_fn does with them.
        ref_hidden, ref_weight, ref_bias: the reference model's (N, H_ref) hidden states and lm_head
            (as in ``fused_linear_kl_divergence``; no gradient flows to them), to give loss_fn the exact
            per-token KL(pi || pi_ref) over the vocabulary (over the kept sets, with cutoffs).
        return_entropy: give loss_fn the entropies (and return them).
        check_kept: with cutoffs, as in ``fused_linear_logprobs``: False gives a target off its kept set
            logp = -inf (loss_fn must give it weight 0) instead of raising ValueError.
        chunk_size: rows per chunk (default: 32 MiB of fp32 logits per chunk and model).
        backend: "auto" | "triton" | "reference" (see the module docstring for what each runs).

    Returns:
        (loss 0-dim fp32 with a gradient to hidden/weight/bias, TokenStats of all N rows, detached, with
        None where not asked for). The same loss and gradients, to fp32 rounding, as ``loss_fn`` applied
        to the ops' outputs and ``backward()``.
    """
    _backend.check_backend_arg(backend)
    ref_head = None
    if ref_hidden is not None or ref_weight is not None:
        if ref_hidden is None or ref_weight is None:
            raise ValueError("ref_hidden and ref_weight must be given together (the reference for the KL), "
                             f"got ref_hidden={'a tensor' if ref_hidden is not None else None}, "
                             f"ref_weight={'a tensor' if ref_weight is not None else None}")
        ref_kl.validate(hidden, weight, ref_hidden, ref_weight, bias, ref_bias, temperature, chunk_size,
                        targets=targets, ignore_index=ignore_index)
        ref_head = (ref_hidden, ref_weight, ref_bias)
    elif ref_bias is not None:
        raise ValueError("ref_bias needs ref_hidden and ref_weight")
    ref.validate(hidden, weight, targets, bias, temperature, ignore_index, chunk_size, cutoffs=cutoffs)
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable (rows, stats) -> 0-dim tensor, got {type(loss_fn).__name__}")
    ref_tl.check_targets_in_range(targets, weight.shape[0], ignore_index)
    chosen = _backend.resolve(_OP, backend, hidden.device, gpu="triton")
    settings = (float(temperature), bool(return_entropy), ignore_index, chunk_size, chosen, loss_fn, ref_head,
                bool(check_kept))
    loss, *stats = _TokenLoss.apply(hidden, weight, bias, targets, cutoffs, settings)
    return loss, TokenStats(stats[0], stats[1] if return_entropy else None, stats[2] if ref_head is not None else None)


class _TokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, cutoffs, settings):
        temperature, want_entropy, ignore_index, chunk_rows, chosen, loss_fn, ref_head, _ = settings
        need = ctx.needs_input_grad[:3]
        if chosen == "reference" and cutoffs is None:
            loss, stats, *grads = ref.forward_with_loss(hidden, weight, bias, targets, loss_fn, temperature,
                                                        want_entropy, ignore_index, chunk_rows, need, ref_head)
        else:
            loss, stats, *grads = _through_the_ops(hidden, weight, bias, targets, cutoffs, settings, need)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_stats):
        # x * 1.0 is x: the usual loss.backward() keeps the forward's gradients bit for bit, with no host sync
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None)


def _through_the_ops(hidden, weight, bias, targets, cutoffs, settings, need):
    """forward_with_loss's result by the public ops: their forwards, then loss_fn over the same row chunks,
    then their backwards with that gradient, all now (the backend's kernels, or cutoffs)."""
    from .ops.fused_linear_kl_divergence import fused_linear_kl_divergence
    from .ops.fused_linear_logprobs import fused_linear_logprobs
    temperature, want_entropy, ignore_index, chunk_rows, chosen, loss_fn, ref_head, check_kept = settings
    with torch.enable_grad():
        leaves = [None if x is None else x.detach().requires_grad_(bool(n))
                  for x, n in zip((hidden, weight, bias), need)]
        out = fused_linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], temperature=temperature,
                                    return_entropy=want_entropy, ignore_index=ignore_index, cutoffs=cutoffs,
                                    check_kept=check_kept, chunk_size=chunk_rows, backend=chosen)
        logp, entropy = out if want_entropy else (out, None)
        kl = None
        if ref_head is not None:
            kl = fused_linear_kl_divergence(leaves[0], leaves[1], ref_head[0], ref_head[1], bias=leaves[2],
                                            ref_bias=ref_head[2], temperature=temperature, cutoffs=cutoffs,
                                            chunk_size=chunk_rows, backend=chosen)
            kl = torch.where(targets != ignore_index, kl, 0.0)  # ignored rows: statistics 0, no gradient
        losses = []
        for rows in row_chunks(targets.shape[0], weight.shape[0], chunk_rows):
            loss = loss_fn(rows, TokenStats(*(None if x is None else x[rows] for x in (logp, entropy, kl))))
            ref.check_chunk_loss(loss)
            losses.append(loss)
        loss = ref.sum_chunk_losses(losses, logp.device)
        wanted = [x for x in leaves if x is not None and x.requires_grad]
        grads = iter(torch.autograd.grad(loss, wanted, allow_unused=True) if wanted and loss.requires_grad
                     else [None] * len(wanted))
    out_grads = [next(grads) if x is not None and x.requires_grad else None for x in leaves]
    out_grads = [torch.zeros_like(x) if g is None and x is not None and x.requires_grad else g
                 for g, x in zip(out_grads, leaves)]
    stats = TokenStats(*(logp.new_empty(0) if x is None else x.detach() for x in (logp, entropy, kl)))
    return (loss.detach(), stats, *out_grads)
