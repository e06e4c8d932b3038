"""Which positions a GPT head reads, and the lm head's paths over those rows only.

A head rarely reads every position: a rollout's logprobs and values are those of its response, a reward
model reads each row's last token, prefill the last prompt token. `GPT.forward` finds those positions
(`wanted_rows`); the last block then runs its output projection and MLP only there (its keys and values
still cover every position, since the wanted queries attend to them), and the head gets just those rows.
The outputs are the same; the work of the last block on the other rows is skipped.

Row indices have a data-dependent size, so they are taken only in eager mode: while torch.compile traces
or a CUDA graph is captured (`rows_allowed`), every position goes through, as before.
"""
from __future__ import annotations

import torch

import rlhf_fast

from ..fused_loss import TokenStats


def rows_allowed(t: torch.Tensor) -> bool:
    """Whether data-dependent row indices may be taken for tensors like t: not while compiling or capturing."""
    return not (torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing()))


def wanted_rows(want: torch.Tensor | None) -> torch.Tensor | None:
    """(M,) int64 flat indices of the True entries of `want`, ascending; None when want is None or all True."""
    if want is None:
        return None
    rows = want.reshape(-1).nonzero().squeeze(1)  # one host sync on CUDA
    return None if rows.shape[0] == want.numel() else rows


def take_rows(x: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    return x if x is None or rows is None else x[rows]


def scatter_rows(v: torch.Tensor, rows: torch.Tensor | None, n: int) -> torch.Tensor:
    """(M, ...) values of `rows` -> (n, ...), 0 elsewhere (what the ops give an ignored position)."""
    return v if rows is None else v.new_zeros((n, *v.shape[1:])).index_put((rows,), v)


def _targeted(hidden, rows, targets, ignore_index):
    """(hidden rows, their flat positions) of the targeted positions: hidden (M, C) already holds `rows`
    (None: all N positions, then the untargeted ones are dropped here)."""
    if rows is None:
        rows = (targets != ignore_index).nonzero().squeeze(1)  # (M,)
        hidden = hidden[rows]
    return hidden, rows


def _reference_kw(hidden, weight, reference, rows, n):
    ref_hidden, ref_weight = reference
    ref_hidden = ref_hidden.reshape(-1, ref_hidden.shape[-1])
    if ref_hidden.shape[0] != n:
        raise ValueError(f"reference hidden states must have {n} positions (this model's), got {ref_hidden.shape[0]}")
    ref_weight = weight if ref_weight is None else ref_weight
    return {"ref_hidden": ref_hidden[rows].to(hidden.dtype).detach(), "ref_weight": ref_weight.to(hidden.dtype).detach()}


def reference_terms(hidden, rows, weight, reference, targets, cutoffs, temperature, ignore_index, backend,
                    with_logprobs):
    """Per-token (kl, logprobs, ref_logprobs), each (N,) fp32, 0 at ignored targets, of the policy's hidden
    rows (M, C) at flat positions `rows` (None: hidden holds all N = len(targets)) and lm_head weight
    against `reference` = (ref_hidden (..., C_ref), ref_weight (V, C_ref) or None for `weight`); kl
    differentiable in the policy, the logprobs constants (None without `with_logprobs`: then the targets
    are not read, and one that left its kept set does not matter). Only the targeted rows go through the op."""
    n = targets.shape[0]
    hidden, rows = _targeted(hidden, rows, targets, ignore_index)
    ref = _reference_kw(hidden, weight.detach(), reference, rows, n)
    out = rlhf_fast.fused_linear_kl_divergence(
        hidden, weight, ref["ref_hidden"], ref["ref_weight"], temperature=temperature,
        cutoffs=take_rows(cutoffs, rows), targets=targets[rows] if with_logprobs else None,
        return_logprobs=with_logprobs, backend=backend)

    def scatter(v):  # (M,) -> (N,), 0 at the untargeted rows
        return scatter_rows(v.float(), rows, n)
    if not with_logprobs:
        return scatter(out), None, None
    kl, logp, ref_logp = out
    return scatter(kl), scatter(logp.detach()), scatter(ref_logp.detach())


def token_loss_terms(hidden, rows, weight, reference, targets, cutoffs, token_loss, temperature, return_entropy,
                     ignore_index, check_kept, backend):
    """(loss, TokenStats of (N,) fp32, 0 at ignored targets) of fused_linear_token_loss over the targeted rows
    only (hidden, rows as in reference_terms); token_loss sees their flat positions."""
    n = targets.shape[0]
    hidden, rows = _targeted(hidden, rows, targets, ignore_index)  # eager only (token_loss is a Python callable)
    ref_kw = {} if reference is None else _reference_kw(hidden, weight, reference, rows, n)
    loss, stats = rlhf_fast.fused_linear_token_loss(
        hidden, weight, targets[rows], lambda r, st: token_loss(rows[r], st), temperature=temperature,
        return_entropy=return_entropy, ignore_index=ignore_index, cutoffs=take_rows(cutoffs, rows),
        check_kept=check_kept, backend=backend, **ref_kw)
    return loss, TokenStats(*(None if v is None else scatter_rows(v, rows, n) for v in stats))


def logprob_terms(hidden, rows, weight, targets, cutoffs, temperature, return_entropy, ignore_index, check_kept,
                  backend):
    """(logprobs, entropy or None), each (N,) fp32, 0 at ignored targets, of fused_linear_logprobs over the
    rows GPT.forward kept (hidden, rows as in reference_terms; with rows None, all N rows go through the
    op, which gives the ignored ones 0: every position is targeted, or indices could not be taken)."""
    n = targets.shape[0]
    out = rlhf_fast.fused_linear_logprobs(hidden, weight, take_rows(targets, rows), temperature=temperature,
                                          return_entropy=return_entropy, ignore_index=ignore_index,
                                          cutoffs=take_rows(cutoffs, rows), check_kept=check_kept, backend=backend)
    logprobs, entropy = out if return_entropy else (out, None)
    return scatter_rows(logprobs, rows, n), (scatter_rows(entropy, rows, n) if return_entropy else None)
