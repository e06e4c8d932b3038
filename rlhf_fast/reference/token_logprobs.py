"""Pure-PyTorch token_logprobs: log_softmax(logits / T) at the target, and the entropy, chunked over rows.

The forward keeps only per-row statistics (max, log-sum-exp, entropy); the backward recomputes softmax one chunk of
rows at a time and writes d(logits) straight into a tensor of the logits' dtype, so the largest fp32
temporary is (chunk_rows, V), never (N, V). With cutoffs (CUTOFFS.md) the statistics cover each row's kept
set only, and d(logits) is 0 off it: computed on a compact copy of the kept logits when they are few, else
on the chunk with the dropped logits set to -inf (_kept.py); a reused 1 MiB bool block marks them.
"""
from __future__ import annotations

import torch

from .. import _validate
from . import _kept
from ._chunks import logits_chunks


def validate(logits, targets, temperature: float, ignore_index: int, name: str = "logits",
             cutoffs: torch.Tensor | None = None) -> None:
    """Shape/dtype/device checks that need no data (safe to run under torch.compile)."""
    _validate.check_tensor(name, logits, dtypes=_validate.FLOAT_DTYPES)
    _validate.check_tensor("targets", targets, dtypes=(torch.int64, torch.int32))
    if logits.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension (..., V), got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} must have a vocabulary of at least 1 entry, got shape {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])} ({name}.shape[:-1]), "
                         f"got {tuple(targets.shape)}")
    _validate.check_same_device(**{name: logits, "targets": targets})
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a Python float, got {type(temperature).__name__}")
    _validate.check_positive("temperature", temperature)
    if not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    validate_cutoffs(cutoffs, targets)


def validate_cutoffs(cutoffs, targets) -> None:
    """cutoffs: None, or float64 of shape targets.shape + (2,) on targets' device (CUTOFFS.md)."""
    if cutoffs is None:
        return
    _validate.check_tensor("cutoffs", cutoffs, dtypes=(torch.float64,))
    want = tuple(targets.shape) + (2,)
    if tuple(cutoffs.shape) != want:
        raise ValueError(f"cutoffs must have shape {want} (targets.shape + (2,): a threshold and a token index "
                         f"per position), got {tuple(cutoffs.shape)}")
    _validate.check_same_device(targets=targets, cutoffs=cutoffs)


def cut_points(cutoffs: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2) float64 cutoffs -> (t (N,) float32, i (N,) int32): token v of row r is dropped iff
    x_v < t_r or (x_v == t_r and v < i_r), i.e. kept iff x_v > t or (x_v == t and v >= i).

    Written as "dropped" so that a NaN logit stays in its row (which then turns NaN, as without cutoffs).
    A NaN threshold (an invalid sampler row) keeps nothing: t = +inf, i = vocab drop every non-NaN logit.
    """
    t = cutoffs[:, 0]
    invalid = torch.isnan(t)
    t32 = torch.where(invalid, float("inf"), t).to(torch.float32)
    i32 = torch.where(invalid, float(vocab), cutoffs[:, 1].clamp(0, vocab)).to(torch.int32)
    return t32.contiguous(), i32.contiguous()


def check_targets_kept(logp: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> None:
    """After a filtered forward: raise ValueError if a (non-ignored) target has logp = -inf, i.e. lies
    outside its row's kept set (or has a -inf logit), reading logp (one host sync on CUDA; a device-side
    assert during CUDA-graph capture, as check_targets_in_range)."""
    if targets.numel() == 0:
        return
    bad = (targets != ignore_index) & torch.isneginf(logp)
    msg = "targets must lie in the kept set that cutoffs describe (x > t, or x == t and index >= i)"
    if capturing(targets):
        torch._assert_async(~bad.any(), msg)
        return
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"{msg}; position {row} (flattened): target {int(targets[row])} has probability 0 "
                         "under its row's filtered distribution")


def capturing(t: torch.Tensor) -> bool:
    """True while t's device is recording a CUDA graph (torch.compile mode="reduce-overhead", CUDAGraph
    capture): no host sync is allowed then."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_targets_in_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raise ValueError if a target is outside [0, vocab) and is not ignore_index (reads the data).

    Eagerly this costs one host sync on CUDA. During CUDA-graph capture it must not sync, so it queues
    a device-side assert instead (torch._assert_async: a bad target then fails the replay with the
    message below, as a CUDA error)."""
    if targets.numel() == 0:
        return
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if capturing(targets):
        torch._assert_async(~bad.any(), f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
        return
    if bool(bad.any()):
        first = targets[bad].flatten()[0].item()
        raise ValueError(f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"found {first}")


# Floor for z - max before it multiplies a probability: exp(-1e4) is 0 in fp32 like exp(-inf), but
# 0 * -1e4 = 0 where 0 * -inf = NaN (a -inf logit, i.e. a masked vocabulary entry, has p = 0).
_LOG_FLOOR = -1e4


def row_stats(z: torch.Tensor, targets: torch.Tensor, ignore_index: int, want_entropy: bool, scratch=None):
    """z: (n, V) fp32 logits already divided by T, overwritten -> (logp, entropy or None, stats).

    stats (2, n) fp32 holds (m, log s) with m = max z and s = sum exp(z - m), so lse = m + log s.
    Keeping the two parts lets every consumer form log p = (z - m) - log s, which is exact to an ulp
    of log p; z - lse would add an ulp of lse (|lse| ~ |logits|). Ignored rows get logp = entropy = 0.
    The entropy is log s - sum e (z - m) / s with e = exp(z - m) (= -sum p log p), computed in
    `scratch` (n, V) fp32 when given, so the chunk loop allocates nothing.
    """
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).long()
    m = z.amax(-1)
    z_t = z.gather(-1, safe[:, None]).squeeze(-1)
    x = z.sub_(m[:, None])  # z - m <= 0
    entropy = None
    if want_entropy:
        e = torch.exp(x, out=scratch[: x.shape[0]]) if scratch is not None else x.exp()
        s = e.sum(-1)
        log_s = s.log()
        entropy = torch.where(valid, log_s - x.clamp_(min=_LOG_FLOOR).mul_(e).sum(-1) / s, 0.0)
    else:
        log_s = x.exp_().sum(-1).log_()
    logp = torch.where(valid, (z_t - m) - log_s, 0.0)
    return logp, entropy, torch.stack([m, log_s])


def grad_z_(z: torch.Tensor, targets, stats, entropy, grad_logp, grad_entropy, ignore_index: int,
            temperature: float, scratch=None) -> torch.Tensor:
    """Overwrite z (n, V) fp32 (logits / T) with d(loss)/d(logits) for one chunk and return it; stats (2, n).

    d logp / dz = onehot(t) - p;  d H / dz = -p (log p + H);  then divided by T (z = logits / T).
    With x = z - m, e = exp(x) and p = e / s, the per-row factors (g, 1 / s, 1 / T) are folded into one
    multiplier so that the block sees x -> exp -> one multiply (-> one fused multiply-add with the
    entropy), and the one-hot term is a scatter of n values. The entropy path needs `scratch` (n, V)
    fp32 for e (or allocates it). Rows whose logits are -inf get p = 0 and zero gradient there.
    """
    safe, one_hot, alpha, beta = _grad_factors(targets, stats, entropy, grad_logp, grad_entropy, ignore_index,
                                               temperature)
    x = z.sub_(stats[0][:, None])  # z - m
    if beta is None:
        dz = x.exp_().mul_(alpha[:, None])
    else:
        e = torch.exp(x, out=scratch[: x.shape[0]]) if scratch is not None else x.exp()
        dz = x.clamp_(min=_LOG_FLOOR).mul_(beta[:, None]).add_(alpha[:, None]).mul_(e)
    return dz.scatter_add_(-1, safe, one_hot[:, None])


def _grad_factors(targets, stats, entropy, grad_logp, grad_entropy, ignore_index: int, temperature: float):
    """The per-row factors of d(loss)/d(logits) = e (alpha + beta x) + onehot(t) * one_hot, with x = z - m and
    e = exp(x) (beta None without an entropy gradient) -> (safe targets (n, 1), one_hot, alpha, beta):
    p (g + g_H (log p + H)) = e (alpha + beta x) with log p = x - log s, negated and divided by T."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).long()[:, None]
    g_logp = torch.where(valid, grad_logp.float(), 0.0) if grad_logp is not None else torch.zeros_like(stats[0])
    inv_s = torch.exp(-stats[1])
    if grad_entropy is None:
        return safe, g_logp / temperature, (g_logp * inv_s).div_(-temperature), None
    g_ent = torch.where(valid, grad_entropy.float(), 0.0)
    alpha = (g_logp + g_ent * (entropy - stats[1])).mul_(inv_s).div_(-temperature)
    return safe, g_logp / temperature, alpha, (g_ent * inv_s).div_(-temperature)


def grad_after_stats_(z: torch.Tensor, scratch, targets, stats, entropy, grad_logp, grad_entropy,
                      ignore_index: int, temperature: float) -> torch.Tensor:
    """grad_z_ for a chunk that row_stats has just worked on (same arguments; z and scratch as row_stats
    left them), so a pass that knows its upstream gradients in the forward never recomputes the logits.

    row_stats leaves e = exp(z - m) in z (no entropy), or e in `scratch` and max(z - m, floor) * e in z,
    which are the two factors of grad_z_'s d(logits) = e (alpha + beta x): one multiply, or two and an add.
    """
    safe, one_hot, alpha, beta = _grad_factors(targets, stats, entropy, grad_logp, grad_entropy, ignore_index,
                                               temperature)
    if beta is None:
        dz = z.mul_(alpha[:, None])
    else:
        dz = z.mul_(beta[:, None]).add_(scratch[: z.shape[0]].mul_(alpha[:, None]))
    return dz.scatter_add_(-1, safe, one_hot[:, None])


def stats_over(chunks, targets, want_entropy: bool, ignore_index: int, cuts=None):
    """row_stats over (rows, [z]) chunks covering targets' N rows -> (logp (N,), entropy (N,) or (0,),
    stats (2, N)), fp32. cuts: None or cut_points(cutoffs): the statistics of the kept, renormalized
    distribution (on the kept logits alone when they are few: _kept.py), and logp = -inf for a target off
    the kept set."""
    n, dev = targets.shape[0], targets.device
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    entropy = torch.empty(n if want_entropy else 0, dtype=torch.float32, device=dev)
    stats = torch.empty(2, n, dtype=torch.float32, device=dev)
    scratch, kept_sets = None, None if cuts is None else _kept.KeptSets(cuts)
    for rows, (z,) in chunks:
        t, off_set = targets[rows], None
        if kept_sets is not None:
            kept = kept_sets.prepare_(z, rows, t, ignore_index)
            if kept is not None:
                lp, ent, st = row_stats(kept.zk, kept.targets, _kept.IGNORE, want_entropy)
                _store(logp, entropy, stats, rows, lp.masked_fill_(kept.dropped, float("-inf")), ent, st)
                continue
            off_set = _target_dropped(z, t, ignore_index)  # read before row_stats works on z in place
        if want_entropy and scratch is None:
            scratch = torch.empty_like(z)
        lp, ent, st = row_stats(z, t, ignore_index, want_entropy, scratch)
        if off_set is not None:
            lp = lp.masked_fill_(off_set, float("-inf"))  # also in a row that keeps nothing
        _store(logp, entropy, stats, rows, lp, ent, st)
    return logp, entropy, stats


def _target_dropped(z, t, ignore_index: int) -> torch.Tensor:
    """(n,) bool: the valid targets whose logit in z (dropped ones set to -inf) is -inf."""
    z_t = z.gather(-1, torch.where(t != ignore_index, t, 0).long()[:, None]).squeeze(-1)
    return (t != ignore_index) & z_t.isneginf()


def _store(logp, entropy, stats, rows, lp, ent, st) -> None:
    logp[rows], stats[:, rows] = lp, st
    if ent is not None:
        entropy[rows] = ent


def grads_over(chunks, targets, stats, entropy, grad_logp, grad_entropy, ignore_index: int, temperature: float,
               cuts=None):
    """Yield (rows, d(logits) fp32) for each (rows, [z]) chunk; grad_z_ overwrites the chunk's z.

    With cuts (cut_points), d(logits) = 0 off the kept set (computed on the kept logits alone when they
    are few: _kept.py; else the dropped logits are set to -inf, which grad_z_ gives a zero gradient); a
    dropped target gets no one-hot term, and a row that keeps nothing (max -inf) is zero, not 0 * NaN."""
    scratch, kept_sets = None, None if cuts is None else _kept.KeptSets(cuts)
    for rows, (z,) in chunks:
        ent = entropy[rows] if grad_entropy is not None else None
        g_e = grad_entropy[rows] if grad_entropy is not None else None
        g_l = grad_logp[rows] if grad_logp is not None else None
        t, st = targets[rows], stats[:, rows]
        kept = kept_sets.prepare_(z, rows, t, ignore_index) if kept_sets is not None else None
        if kept is not None:
            g_l = g_l.masked_fill(kept.dropped, 0.0) if g_l is not None else None
            dz = kept.scatter_into(z, grad_z_(kept.zk, kept.targets, st, ent, g_l, g_e, _kept.IGNORE, temperature))
        else:
            if kept_sets is not None and g_l is not None:
                g_l = g_l.masked_fill(_target_dropped(z, t, ignore_index), 0.0)
            if grad_entropy is not None and scratch is None:
                scratch = torch.empty_like(z)
            dz = grad_z_(z, t, st, ent, g_l, g_e, ignore_index, temperature, scratch)
        if kept_sets is not None:
            empty = st[0] == float("-inf")
            if empty.any():
                dz[empty] = 0.0
        yield rows, dz


def forward(logits: torch.Tensor, targets: torch.Tensor, temperature: float, want_entropy: bool,
            ignore_index: int, chunk_rows: int | None = None, cutoffs: torch.Tensor | None = None):
    """logits (N, V), targets (N,), cutoffs None or (N, 2) float64 -> (logp (N,), entropy (N,) or (0,),
    stats (2, N)), fp32."""
    cuts = None if cutoffs is None else cut_points(cutoffs, logits.shape[-1])
    return stats_over(logits_chunks((logits,), temperature, chunk_rows), targets, want_entropy, ignore_index, cuts)


def backward(grad_logp, grad_entropy, logits, targets, stats, entropy, temperature: float,
             ignore_index: int, chunk_rows: int | None = None, cutoffs: torch.Tensor | None = None) -> torch.Tensor:
    """Returns d(logits), same shape and dtype as logits."""
    cuts = None if cutoffs is None else cut_points(cutoffs, logits.shape[-1])
    grad = torch.empty_like(logits)
    for rows, dz in grads_over(logits_chunks((logits,), temperature, chunk_rows), targets, stats, entropy,
                               grad_logp, grad_entropy, ignore_index, temperature, cuts):
        grad[rows] = dz
    return grad


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, want_entropy, ignore_index, cutoffs):
        logp, entropy, stats = forward(logits, targets, temperature, want_entropy, ignore_index, cutoffs=cutoffs)
        ctx.save_for_backward(logits, targets, stats, entropy, cutoffs)
        ctx.temperature, ctx.ignore_index, ctx.want_entropy = temperature, ignore_index, want_entropy
        ctx.mark_non_differentiable(stats)
        return logp, entropy, stats

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_stats):
        logits, targets, stats, entropy, cutoffs = ctx.saved_tensors
        if not ctx.want_entropy:
            grad_entropy = None
        grad = backward(grad_logp, grad_entropy, logits, targets, stats, entropy, ctx.temperature,
                        ctx.ignore_index, cutoffs=cutoffs)
        return grad, None, None, None, None, None


def token_logprobs(logits, targets, *, temperature=1.0, return_entropy=False, ignore_index=-100, cutoffs=None):
    """Reference twin of rlhf_fast.token_logprobs (see its docstring for the contract)."""
    validate(logits, targets, temperature, ignore_index, cutoffs=cutoffs)
    vocab = logits.shape[-1]
    check_targets_in_range(targets, vocab, ignore_index)
    lead = logits.shape[:-1]
    flat_cutoffs = None if cutoffs is None else cutoffs.reshape(-1, 2)
    logp, entropy, _ = _TokenLogprobs.apply(logits.reshape(-1, vocab), targets.reshape(-1),
                                            float(temperature), bool(return_entropy), ignore_index, flat_cutoffs)
    if cutoffs is not None:
        check_targets_kept(logp, targets.reshape(-1), ignore_index)
    if return_entropy:
        return logp.reshape(lead), entropy.reshape(lead)
    return logp.reshape(lead)
