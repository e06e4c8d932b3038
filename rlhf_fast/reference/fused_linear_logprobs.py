"""Pure-PyTorch fused_linear_logprobs: lm_head matmul + token logprob/entropy, chunked over tokens.

Only one chunk of logits, (chunk_rows, V) fp32, exists at a time. The backward recomputes each chunk's
logits (one extra matmul) instead of keeping them, and accumulates d(weight) over chunks in fp32.
In fp32 the matmuls are ~94% of the time (1 thread, N=4096, H=512, V=32000): each chunk's block is
written by the matmul and then worked on in place (max, exp, sum; in the backward exp, one multiply
and a scatter of the one-hot term), with no (chunk_rows, V) temporary.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _validate
from . import kl_divergence as kld
from . import token_logprobs as tl
from ._chunks import lm_head_backward, lm_head_chunks


def validate(hidden, weight, targets, bias, temperature, ignore_index, chunk_size,
             names=("hidden", "weight", "targets", "bias"), cutoffs=None) -> None:
    """Data-free checks; `names` lets the KL op reuse this for its ref_* arguments."""
    h_name, w_name, t_name, b_name = names
    _validate.check_tensor(h_name, hidden, ndim=2, dtypes=_validate.FLOAT_DTYPES)
    _validate.check_tensor(w_name, weight, ndim=2, dtypes=(hidden.dtype,))
    _validate.check_dim(w_name, weight, 1, hidden.shape[1], f"hidden size ({h_name}.shape[1])")
    if weight.shape[0] == 0:
        raise ValueError(f"{w_name} must have a vocabulary of at least 1 row (V, H), got shape {tuple(weight.shape)}")
    if bias is not None:
        _validate.check_tensor(b_name, bias, ndim=1, dtypes=(hidden.dtype,))
        _validate.check_dim(b_name, bias, 0, weight.shape[0], f"vocab size ({w_name}.shape[0])")
    if targets is not None:
        _validate.check_tensor(t_name, targets, ndim=1, dtypes=(torch.int64, torch.int32))
        _validate.check_dim(t_name, targets, 0, hidden.shape[0], f"token count ({h_name}.shape[0])")
    _validate.check_same_device(**{h_name: hidden, w_name: weight, t_name: targets, b_name: bias})
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a Python float, got {type(temperature).__name__}")
    _validate.check_positive("temperature", temperature)
    if not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if cutoffs is not None:
        tl.validate_cutoffs(cutoffs, targets)


def forward(hidden, weight, bias, targets, temperature: float, want_entropy: bool, ignore_index: int,
            chunk_rows: int | None = None, cutoffs=None):
    """hidden (N, H), weight (V, H), cutoffs None or (N, 2) float64 -> (logp (N,), entropy (N,) or (0,),
    stats (2, N) = (max, log s)), fp32."""
    chunks = lm_head_chunks(((hidden, weight, bias),), temperature, chunk_rows)
    cuts = None if cutoffs is None else tl.cut_points(cutoffs, weight.shape[0])
    return tl.stats_over(chunks, targets, want_entropy, ignore_index, cuts)


def backward(grad_logp, grad_entropy, hidden, weight, bias, targets, stats, entropy, temperature: float,
             ignore_index: int, chunk_rows: int | None = None, need=(True, True, True), cutoffs=None):
    """Returns (d hidden, d weight, d bias); an entry is None where `need` says it is not wanted."""
    chunks = lm_head_chunks(((hidden, weight, bias),), temperature, chunk_rows)
    cuts = None if cutoffs is None else tl.cut_points(cutoffs, weight.shape[0])
    grads = tl.grads_over(chunks, targets, stats, entropy, grad_logp, grad_entropy, ignore_index, temperature, cuts)
    return lm_head_backward(grads, hidden, weight, bias, need)


class TokenStats(NamedTuple):
    """What a fused_linear_token_loss loss_fn receives for its rows: fp32 (n,) tensors, or None where
    not asked for (entropy without return_entropy, kl without a reference head)."""
    logp: torch.Tensor
    entropy: torch.Tensor | None
    kl: torch.Tensor | None


def forward_with_loss(hidden, weight, bias, targets, loss_fn, temperature: float, want_entropy: bool,
                      ignore_index: int, chunk_rows: int | None = None, need=(True, True, True), ref=None):
    """forward and backward in one pass, for a caller that knows its loss in the forward
    (rlhf_fast.fused_linear_token_loss): per chunk of rows, the logits (one matmul; two with `ref`, the
    reference's (hidden, weight, bias), for KL(pi || pi_ref)), their statistics, the chunk's loss and its
    gradient (`chunk_loss_grads`), and d(logits) pushed through the lm_head (two matmuls) while the
    chunk's exponentials are still in hand: 3 (N, H, V) matmuls where forward + backward take 4 (with
    the KL, 4 where they take 6), and still one (chunk_rows, V) block per buffer.

    Returns (loss 0-dim fp32, TokenStats over all N rows (entropy (0,) / kl (0,) when not asked for),
    d hidden, d weight, d bias), an entry of the last three None where `need` says it is not wanted."""
    n, dev = targets.shape[0], hidden.device
    out = TokenStats(*(torch.empty(n if want else 0, dtype=torch.float32, device=dev)
                       for want in (True, want_entropy, ref is not None)))
    heads = ((hidden, weight, bias),) if ref is None else ((hidden, weight, bias), tuple(ref))
    losses = []

    def grad_chunks():
        scratch = None
        for rows, zs in lm_head_chunks(heads, temperature, chunk_rows):
            t = targets[rows]
            if scratch is None and (want_entropy or ref is not None):
                scratch = torch.empty(1 + (ref is not None), *zs[0].shape, dtype=torch.float32, device=dev)
            e = None if scratch is None else scratch[0]
            if ref is None:
                lp, ent, st = tl.row_stats(zs[0], t, ignore_index, want_entropy, e)
                stats = TokenStats(lp, ent, None)
            else:
                *values, st = kld.loss_row_stats(zs[0], zs[1], t, ignore_index, want_entropy, scratch)
                stats = TokenStats(*values)
            for buf, value in zip(out, stats):
                if value is not None:
                    buf[rows] = value
            loss, grads = chunk_loss_grads(loss_fn, rows, stats)
            losses.append(loss)
            if ref is None:
                yield rows, tl.grad_after_stats_(zs[0], e, t, st, stats.entropy, grads.logp, grads.entropy,
                                                 ignore_index, temperature)
            else:
                yield rows, kld.grad_after_loss_stats_(zs[0], zs[1], e, t, st, stats.entropy, stats.kl,
                                                       grads, ignore_index, temperature)

    d = lm_head_backward(grad_chunks(), hidden, weight, bias, need)
    return (sum_chunk_losses(losses, dev), out, *d)


def check_chunk_loss(loss) -> None:
    """loss_fn's result for its rows must be a 0-dim tensor."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError("loss_fn must return a 0-dim tensor (the loss of its rows), got "
                         f"{type(loss).__name__ if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}")


def sum_chunk_losses(losses: list, device) -> torch.Tensor:
    """The chunks' losses summed in fp64 (their order then does not matter to fp32), as a 0-dim fp32 tensor."""
    if not losses:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(losses).double().sum().float()


def chunk_loss_grads(loss_fn, rows: slice, stats: TokenStats) -> tuple[torch.Tensor, TokenStats]:
    """(loss, its gradient with respect to each of `stats`) of loss_fn(rows, stats) for one chunk of
    rows, by autograd on those (n,) inputs alone (everything else loss_fn reads is a constant); a
    statistic the loss does not use gets a zero gradient."""
    with torch.enable_grad():
        leaves = TokenStats(*(None if x is None else x.detach().requires_grad_() for x in stats))
        loss = loss_fn(rows, leaves)
        check_chunk_loss(loss)
        inputs = [x for x in leaves if x is not None]
        grads = iter(torch.autograd.grad(loss, inputs, allow_unused=True) if loss.requires_grad
                     else [None] * len(inputs))
    grads = [None if x is None else next(grads) for x in leaves]
    return loss.detach().float(), TokenStats(*(g if g is not None or x is None else torch.zeros_like(x)
                                                for g, x in zip(grads, leaves)))


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, want_entropy, ignore_index, chunk_rows, cutoffs):
        logp, entropy, stats = forward(hidden, weight, bias, targets, temperature, want_entropy,
                                       ignore_index, chunk_rows, cutoffs)
        ctx.save_for_backward(hidden, weight, bias, targets, stats, entropy, cutoffs)
        ctx.args = (temperature, want_entropy, ignore_index, chunk_rows)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, stats, entropy, cutoffs = ctx.saved_tensors
        temperature, want_entropy, ignore_index, chunk_rows = ctx.args
        if grad_logp is None:
            grad_logp = torch.zeros_like(stats[0])
        grads = backward(grad_logp, grad_entropy if want_entropy else None, hidden, weight, bias, targets,
                         stats, entropy, temperature, ignore_index, chunk_rows, ctx.needs_input_grad[:3], cutoffs)
        return (*grads, None, None, None, None, None, None)


def fused_linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=False,
                          ignore_index=-100, chunk_size=None, cutoffs=None):
    """Reference twin of rlhf_fast.fused_linear_logprobs (see its docstring for the contract)."""
    validate(hidden, weight, targets, bias, temperature, ignore_index, chunk_size, cutoffs=cutoffs)
    tl.check_targets_in_range(targets, weight.shape[0], ignore_index)
    logp, entropy = _FusedLinearLogprobs.apply(hidden, weight, bias, targets, float(temperature),
                                               bool(return_entropy), ignore_index, chunk_size, cutoffs)
    if cutoffs is not None:
        tl.check_targets_kept(logp, targets, ignore_index)
    return (logp, entropy) if return_entropy else logp
