"""Pure-PyTorch fused-linear KL(pi || pi_ref): both lm_head matmuls and the exact KL, chunked over tokens.

Only one (chunk_rows, V) fp32 block of each model's logits exists at a time; the backward recomputes
both blocks and accumulates d(weight) in fp32. Gradients flow to the policy side only.

With `cutoffs` (the sampler's kept sets, see `kept`), every chunk's logits of both models are set to
-inf off the row's kept set K, which the policy's tempered logits decide; the KL statistics are then
those of the two distributions renormalized over K, and the gradient is zero off K. With `targets`, the
forward also gathers each target's tempered logit of both models (before that masking), so the
targets' log-probabilities come out of the same pass.
"""
from __future__ import annotations

import torch

from .. import _validate
from . import fused_linear_logprobs as fll
from . import kl_divergence as kld
from . import token_logprobs as tlp
from ._chunks import lm_head_backward, lm_head_chunks


def validate(hidden, weight, ref_hidden, ref_weight, bias, ref_bias, temperature, chunk_size, cutoffs=None,
             targets=None, ignore_index=-100) -> None:
    fll.validate(hidden, weight, targets, bias, temperature, ignore_index, chunk_size)
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
    if cutoffs is not None:
        _validate.check_tensor("cutoffs", cutoffs, ndim=2, dtypes=(torch.float64,))
        if tuple(cutoffs.shape) != (hidden.shape[0], 2):
            raise ValueError(f"cutoffs must have shape ({hidden.shape[0]}, 2) (hidden.shape[0], then the cut "
                             f"value and token index), got shape {tuple(cutoffs.shape)}")
        _validate.check_same_device(hidden=hidden, cutoffs=cutoffs)


def off_k(x: torch.Tensor, cut: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Complement of the kept sets: x (n, m) fp32 tempered policy logits at token indices cols (m,) or
    (n, m), cut (n, 2) float64 cutoffs -> (n, m) bool, True where the token is NOT kept.

    The CUTOFFS contract keeps `x > t or (x == t and v >= i)`; this drops `x < t or (x == t and v < i)`,
    so a NaN logit stays in K (and turns its row NaN, as without cutoffs, rather than dropping out),
    and drops everything on a NaN cut (an invalid row: its KL and log-probabilities are NaN). In-place
    bool ops: this runs on every (chunk_rows, V) block, forward and backward.
    """
    t = cut[:, 0].float()[:, None]
    off = torch.lt(x, t)
    ties = torch.eq(x, t)
    ties &= cols < cut[:, 1][:, None]
    off |= ties
    off |= t != t
    return off


def _cut(chunks, cutoffs, targets, mask_ref: bool = True):
    """Chunks as lm_head_chunks yields them, plus the targets' tempered logits (zt, zrt) gathered first
    (None without targets); with cutoffs, the policy's logits (and the reference's, if mask_ref: the
    backward's d(logits) needs only p = 0 off K) are then set to -inf off the kept sets."""
    for rows, (z, zr) in chunks:
        gathered = None
        if targets is not None:
            t = targets[rows].long().clamp(0, z.shape[1] - 1)[:, None]
            gathered = z.gather(1, t)[:, 0], zr.gather(1, t)[:, 0]
        if cutoffs is not None:
            off = off_k(z, cutoffs[rows], torch.arange(z.shape[1], device=z.device))
            z.masked_fill_(off, float("-inf"))
            if mask_ref:
                zr.masked_fill_(off, float("-inf"))
        yield rows, (z, zr), gathered


def target_logprobs(zt, zrt, targets, stats, cutoffs, ignore_index: int) -> torch.Tensor:
    """(2, N) fp32 (logp, ref_logp) of the targets under pi_K and pi_ref_K, from their tempered logits
    zt, zrt (N,) fp32 and the KL statistics (m_p, log s_p, m_q, log s_q over K): (z - m) - log s as in
    token_logprobs; 0 at ignore_index; -inf where a target is off its row's kept set."""
    valid = targets != ignore_index
    logp = (zt - stats[0]) - stats[1]
    ref_logp = (zrt - stats[2]) - stats[3]
    if cutoffs is not None:
        in_k = ~off_k(zt[:, None], cutoffs, targets[:, None])[:, 0]
        logp = torch.where(in_k, logp, float("-inf"))
        ref_logp = torch.where(in_k, ref_logp, float("-inf"))
    return torch.stack([torch.where(valid, logp, 0.0), torch.where(valid, ref_logp, 0.0)])


def check_targets_kept(zt: torch.Tensor, targets: torch.Tensor, cutoffs: torch.Tensor,
                       ignore_index: int) -> None:
    """Raise ValueError if a target (not ignore_index) lies off its row's kept set, decided on zt (N,), the
    target's tempered policy logit as the forward computed it (reads the data; a device-side assert
    during CUDA-graph capture, as tlp.check_targets_in_range)."""
    if targets.numel() == 0:
        return
    off = (targets != ignore_index) & off_k(zt[:, None], cutoffs, targets[:, None])[:, 0]
    msg = "targets must lie in their row's kept set (cutoffs: x > t, or x == t and index >= i)"
    if tlp.capturing(targets):
        torch._assert_async(~off.any(), msg)
        return
    if bool(off.any()):
        row = int(torch.nonzero(off)[0, 0])
        raise ValueError(f"{msg}; row {row}: target {int(targets[row])} has x = {float(zt[row])!r}, "
                         f"cutoffs[{row}] = {tuple(cutoffs[row].tolist())}")


def forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature: float,
            chunk_rows: int | None = None, cutoffs=None, targets=None, ignore_index: int = -100):
    """-> (kl (N,), stats (5, N) = (m_p, log s_p, m_q, log s_q, mean), target_logits (2, N) = (zt, zrt) or
    (0, N) without targets), fp32 (see kl_divergence.row_stats); with cutoffs, all over the kept sets."""
    n, device = hidden.shape[0], hidden.device
    chunks = lm_head_chunks(((hidden, weight, bias), (ref_hidden, ref_weight, ref_bias)), temperature, chunk_rows)
    kl = torch.empty(n, dtype=torch.float32, device=device)
    stats = torch.empty(5, n, dtype=torch.float32, device=device)
    zts = torch.empty(2 if targets is not None else 0, n, dtype=torch.float32, device=device)
    for rows, (z, zr), gathered in _cut(chunks, cutoffs, targets):
        if gathered is not None:
            zts[0, rows], zts[1, rows] = gathered
        kl[rows], stats[:, rows] = kld.row_stats(z, zr)
    return kl, stats, zts


def backward(grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl,
             temperature: float, chunk_rows: int | None = None, need=(True, True, True), cutoffs=None):
    """Returns (d hidden, d weight, d bias), None where not needed."""
    chunks = lm_head_chunks(((hidden, weight, bias), (ref_hidden, ref_weight, ref_bias)), temperature, chunk_rows)
    cut_chunks = ((rows, zs) for rows, zs, _ in _cut(chunks, cutoffs, None, mask_ref=False))
    grads = kld.grads_over(cut_chunks, stats, kl, grad_kl, temperature)
    return lm_head_backward(grads, hidden, weight, bias, need)


class _FusedLinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, chunk_rows, cutoffs,
                targets, ignore_index):
        kl, stats, zts = forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, chunk_rows,
                                 cutoffs, targets, ignore_index)
        logps = zts
        if targets is not None:
            if cutoffs is not None:
                check_targets_kept(zts[0], targets, cutoffs, ignore_index)
            logps = target_logprobs(zts[0], zts[1], targets, stats, cutoffs, ignore_index)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl, cutoffs)
        ctx.args = (temperature, chunk_rows)
        ctx.mark_non_differentiable(logps)
        return kl, logps

    @staticmethod
    def backward(ctx, grad_kl, _grad_logps):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl, cutoffs = ctx.saved_tensors
        temperature, chunk_rows = ctx.args
        grads = backward(grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats, kl,
                         temperature, chunk_rows, ctx.needs_input_grad[:3], cutoffs)
        return (*grads, None, None, None, None, None, None, None, None)


def fused_linear_kl_divergence(hidden, weight, ref_hidden, ref_weight, *, bias=None, ref_bias=None,
                               temperature=1.0, cutoffs=None, targets=None, return_logprobs=False,
                               ignore_index=-100, chunk_size=None):
    """Reference twin of rlhf_fast.fused_linear_kl_divergence (see its docstring for the contract)."""
    check_logprob_args(targets, return_logprobs)
    validate(hidden, weight, ref_hidden, ref_weight, bias, ref_bias, temperature, chunk_size, cutoffs, targets,
             ignore_index)
    if targets is not None:
        tlp.check_targets_in_range(targets, weight.shape[0], ignore_index)
    kl, logps = _FusedLinearKL.apply(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, float(temperature),
                                     chunk_size, cutoffs, targets, ignore_index)
    return (kl, logps[0], logps[1]) if return_logprobs else kl


def check_logprob_args(targets, return_logprobs) -> None:
    """targets and return_logprobs=True come together: one without the other is a caller's mistake."""
    if not isinstance(return_logprobs, bool):
        raise ValueError(f"return_logprobs must be a bool, got {type(return_logprobs).__name__}")
    if return_logprobs and targets is None:
        raise ValueError("return_logprobs=True needs targets (N,): the tokens whose log-probabilities to return")
    if targets is not None and not return_logprobs:
        raise ValueError("targets is given but return_logprobs is False: pass return_logprobs=True to get the "
                         "targets' log-probabilities (targets has no other use here)")
