"""fused_linear_token_loss: a per-token loss of the lm_head's logprobs, with its gradient taken in the forward.

`fused_linear_logprobs` cannot know, in its forward, the gradient that will flow back into its per-token
logprobs, so its backward recomputes the logits (4 (N, H, V) matmuls in all, where the unfused path's
saved (N, V) softmax needs 3). A training loss is different: the loss of a token is a function of that
token's logprob (and entropy) and of constants (old logprobs, advantages, mask, the batch's denominator),
so its gradient is known as soon as the row's statistics are. This composite takes the loss as a
function and computes, chunk by chunk of rows, the logits, the loss and d(logits) together, as
Liger-Kernel's fused linear losses do: 3 matmuls and one (chunk, V) block of memory.

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
from .reference import fused_linear_logprobs as ref
from .reference import token_logprobs as ref_tl
from .reference._chunks import row_chunks

_OP = "fused_linear_token_loss"

LossFn = Callable[[slice, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def fused_linear_token_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, *,
                            bias: torch.Tensor | None = None, temperature: float = 1.0, return_entropy: bool = False,
                            ignore_index: int = -100, cutoffs: torch.Tensor | None = None,
                            chunk_size: int | None = None, backend: str = "auto"):
    """loss = sum over chunks of rows of loss_fn(rows, logp[rows], entropy[rows]), with
    logp, entropy = fused_linear_logprobs(hidden, weight, targets, ...) and both gradients computed in the
    forward: ``loss.backward()`` only scales them.

    Args:
        hidden: (N, H) fp32/bf16/fp16; weight: (V, H) same dtype; targets: (N,) int64/int32 in [0, V) or
            ignore_index; bias, temperature, ignore_index, cutoffs: as in ``fused_linear_logprobs``.
        loss_fn: ``loss_fn(rows, logp, entropy) -> 0-dim tensor``: the loss of the rows ``rows`` (a slice
            of range(N)) given their fp32 logprobs (n,) and entropies (n,) (None unless return_entropy).
            It must be a sum over those rows of terms that depend on their own logp/entropy only, plus
            constants: e.g. ``-(adv[rows] * (logp - old[rows]).exp() * w[rows]).sum()``. Tensors it reads
            other than logp/entropy receive no gradient. Ignored rows (targets == ignore_index) have
            logp = entropy = 0 and get no gradient, whatever loss_fn does with them.
        return_entropy: pass entropies to loss_fn (and return them).
        chunk_size: rows per chunk (default: 32 MiB of fp32 logits per chunk).
        backend: "auto" | "triton" | "reference" (see the module docstring for what each runs).

    Returns:
        (loss 0-dim fp32 with a gradient to hidden/weight/bias, logp (N,) fp32 detached,
        entropy (N,) fp32 detached or None). The same loss and gradients, to fp32 rounding, as
        ``loss_fn`` applied to ``fused_linear_logprobs``'s outputs and ``backward()``.
    """
    _backend.check_backend_arg(backend)
    ref.validate(hidden, weight, targets, bias, temperature, ignore_index, chunk_size, cutoffs=cutoffs)
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable (rows, logp, entropy) -> 0-dim tensor, got {type(loss_fn).__name__}")
    ref_tl.check_targets_in_range(targets, weight.shape[0], ignore_index)
    chosen = _backend.resolve(_OP, backend, hidden.device, gpu="triton")
    settings = (float(temperature), bool(return_entropy), ignore_index, chunk_size, chosen)
    loss, logp, entropy = _TokenLoss.apply(hidden, weight, bias, targets, cutoffs, loss_fn, settings)
    return loss, logp, (entropy if return_entropy else None)


class _TokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, cutoffs, loss_fn, settings):
        temperature, want_entropy, ignore_index, chunk_rows, chosen = settings
        need = ctx.needs_input_grad[:3]
        if chosen == "reference" and cutoffs is None:
            loss, logp, entropy, *grads = ref.forward_with_loss(hidden, weight, bias, targets, loss_fn, temperature,
                                                                want_entropy, ignore_index, chunk_rows, need)
        else:
            loss, logp, entropy, *grads = _through_the_op(hidden, weight, bias, targets, cutoffs, loss_fn, settings,
                                                          need)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        # x * 1.0 is x: the usual loss.backward() keeps the forward's gradients bit for bit, with no host sync
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None)


def _through_the_op(hidden, weight, bias, targets, cutoffs, loss_fn, settings, need):
    """forward_with_loss's result by the public op: its forward, then loss_fn over the same row chunks,
    then the op's backward with that gradient, all now (the backend's kernels, or cutoffs)."""
    from .ops.fused_linear_logprobs import fused_linear_logprobs
    temperature, want_entropy, ignore_index, chunk_rows, chosen = settings
    with torch.enable_grad():
        leaves = [None if x is None else x.detach().requires_grad_(bool(n)) for x, n in zip((hidden, weight, bias), need)]
        out = fused_linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], temperature=temperature,
                                    return_entropy=want_entropy, ignore_index=ignore_index, cutoffs=cutoffs,
                                    chunk_size=chunk_rows, backend=chosen)
        logp, entropy = out if want_entropy else (out, None)
        losses = [loss_fn(rows, logp[rows], None if entropy is None else entropy[rows])
                  for rows in row_chunks(targets.shape[0], weight.shape[0], chunk_rows)]
        for loss in losses:
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError("loss_fn must return a 0-dim tensor (the loss of its rows)")
        loss = torch.stack(losses).double().sum().float() if losses else logp.new_zeros(())
        wanted = [x for x in leaves if x is not None and x.requires_grad]
        grads = iter(torch.autograd.grad(loss, wanted, allow_unused=True) if wanted and loss.requires_grad
                     else [None] * len(wanted))
    out_grads = [next(grads) if x is not None and x.requires_grad else None for x in leaves]
    out_grads = [torch.zeros_like(x) if g is None and x is not None and x.requires_grad else g
                 for g, x in zip(out_grads, leaves)]
    return (loss.detach(), logp.detach(), (entropy.detach() if entropy is not None else logp.new_empty(0)),
            *out_grads)
