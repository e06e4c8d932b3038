"""Pure-PyTorch exact KL(pi || pi_ref) per row over the whole vocab, chunked over rows.

With z = logits / T, zr = ref_logits / T, p = softmax(z), q = softmax(zr):
    KL = sum_v p (log p - log q)
    dKL/dz = p * (log p - log q - KL) / T,   dKL/dzr = (q - p) / T
Only per-row statistics are saved; the backward recomputes p and q one chunk of rows at a time.
"""
from __future__ import annotations

import torch

from .. import _validate
from ._chunks import logits_chunks
from .token_logprobs import _LOG_FLOOR


def validate(logits, ref_logits, temperature) -> None:
    _validate.check_tensor("logits", logits, dtypes=_validate.FLOAT_DTYPES)
    _validate.check_tensor("ref_logits", ref_logits, dtypes=_validate.FLOAT_DTYPES)
    if logits.dim() < 1:
        raise ValueError(f"logits must have at least 1 dimension (..., V), got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a vocabulary of at least 1 entry, got shape {tuple(logits.shape)}")
    if tuple(ref_logits.shape) != tuple(logits.shape):
        raise ValueError(f"ref_logits must have the shape of logits {tuple(logits.shape)}, "
                         f"got {tuple(ref_logits.shape)}")
    _validate.check_same_device(logits=logits, ref_logits=ref_logits)
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a Python float, got {type(temperature).__name__}")
    _validate.check_positive("temperature", temperature)


def row_stats(z: torch.Tensor, zr: torch.Tensor, scratch: torch.Tensor | None = None):
    """z, zr (n, V) fp32 (already / T), both overwritten -> (kl (n,), stats (5, n) = (m_p, log s_p, m_q,
    log s_q, mean)).

    As in token_logprobs, log p = (z - m) - log s (never z - lse) keeps every log-probability exact to
    its own ulp; KL is then sum p (log p - log q), the formula PyTorch uses, evaluated as
    sum e_p (x_p - x_q) / s_p - log s_p + log s_q with x = z - m, e = exp(x). mean = KL + log s_p -
    log s_q is the row constant of the Triton backward (kernels/kl_divergence.py); it is stored here
    only so that both backends' stats have one layout. `scratch` (n, V) fp32, when given, holds the
    exponentials so the chunk loop allocates no (n, V) block.
    """
    m_p, m_q = z.amax(-1), zr.amax(-1)
    x_p, x_q = z.sub_(m_p[:, None]), zr.sub_(m_q[:, None])
    e = torch.exp(x_q, out=scratch[: x_q.shape[0]]) if scratch is not None else x_q.exp()
    log_s_q = e.sum(-1).log_()
    impossible = x_p.isneginf()  # p = 0 (-inf logits) contributes 0, as in torch.distributions
    e = torch.exp(x_p, out=e)
    s_p = e.sum(-1)
    log_s_p = s_p.log()
    kl = x_p.sub_(x_q).masked_fill_(impossible, 0.0).mul_(e).sum(-1).div_(s_p).sub_(log_s_p).add_(log_s_q)
    mean = kl + (log_s_p - log_s_q)
    return kl, torch.stack([m_p, log_s_p, m_q, log_s_q, mean])


def grad_z_(z, zr, stats, kl, grad_kl, temperature: float, scratch: torch.Tensor | None = None):
    """Overwrite z with d KL / d(logits) for one chunk and return it; zr is left holding x_q = zr - m_q
    and `scratch` (when given) e_p = exp(z - m_p), which the logits backward reuses for d(ref_logits).

    d KL / dz = p (log p - log q - KL) with p = e_p / s_p, i.e. c e_p (x_p - x_q + log s_q - log s_p - KL)
    with the row factor c = grad_kl / (T s_p), folded in before the multiply by e_p.
    """
    x_p, x_q = z.sub_(stats[0][:, None]), zr.sub_(stats[2][:, None])
    impossible = x_p.isneginf()  # p = 0: zero gradient
    e = torch.exp(x_p, out=scratch[: x_p.shape[0]]) if scratch is not None else x_p.exp()
    shift = stats[3] - stats[1] - kl
    c = grad_kl.float() * torch.exp(-stats[1]) / temperature
    return x_p.sub_(x_q).add_(shift[:, None]).mul_(c[:, None]).masked_fill_(impossible, 0.0).mul_(e)


def loss_row_stats(z, zr, targets, ignore_index: int, want_entropy: bool, scratch):
    """The statistics of a loss pass with a reference (fused_linear_token_loss): z, zr (n, V) fp32
    (already / T), overwritten, and scratch (2, >= n, V) fp32 -> (logp, entropy or None, kl, saved), each
    (n,), 0 on ignored rows; saved = (s_p, log s_p, log s_q) for grad_after_loss_stats_, which reuses what
    this leaves: max(x_p, floor) in z, x_p - x_q in zr (0 where p = 0), e_p = exp(x_p) in scratch[0].

    KL as row_stats computes it (sum e_p (x_p - x_q) / s_p - log s_p + log s_q); logp and entropy as
    token_logprobs.row_stats does (log p = x_p - log s_p, entropy = log s_p - sum e_p x_p / s_p).
    """
    n = z.shape[0]
    e, prod = scratch[0, :n], scratch[1, :n]
    valid = targets != ignore_index
    zero = torch.zeros((), dtype=torch.float32, device=z.device)
    m_p, m_q = z.amax(-1), zr.amax(-1)
    z_t = z.gather(-1, torch.where(valid, targets, 0).long()[:, None]).squeeze(-1)
    x_p, x_q = z.sub_(m_p[:, None]), zr.sub_(m_q[:, None])
    log_s_q = torch.exp(x_q, out=e).sum(-1).log_()
    impossible = x_p.isneginf()  # p = 0 (-inf logits) contributes 0, as in torch.distributions
    s_p = torch.exp(x_p, out=e).sum(-1)
    log_s_p = s_p.log()
    d = torch.sub(x_p, x_q, out=x_q).masked_fill_(impossible, 0.0)
    kl = torch.where(valid, torch.mul(e, d, out=prod).sum(-1).div_(s_p).sub_(log_s_p).add_(log_s_q), zero)
    x_p.clamp_(min=_LOG_FLOOR)
    entropy = (torch.where(valid, log_s_p - torch.mul(e, x_p, out=prod).sum(-1) / s_p, zero)
               if want_entropy else None)
    logp = torch.where(valid, (z_t - m_p) - log_s_p, zero)
    return logp, entropy, kl, (s_p, log_s_p, log_s_q)


def grad_after_loss_stats_(z, zr, e, targets, saved, entropy, kl, grads, ignore_index: int, temperature: float):
    """d(loss)/d(policy logits) of one chunk after loss_row_stats (z, zr, e as it left them), for the
    gradients `grads` (logp, entropy or None, kl) of the loss with respect to those statistics; d(logits) is
    returned in zr's buffer. With log p = x_p - log s_p and log q = x_q - log s_q, per token v:
        g_logp (onehot - p) - g_H p (log p + H) + g_KL p (log p - log q - KL)
      = onehot g_logp + (e_p / s_p) (alpha + beta x_p + gamma (x_p - x_q)),  all / T,
    alpha = -g_logp + g_H (log s_p - H) + g_KL (log s_q - log s_p - KL), beta = -g_H, gamma = g_KL;
    the row factors 1 / (s_p T) are folded into alpha, beta, gamma before the (n, V) passes."""
    s_p, log_s_p, log_s_q = saved
    valid = targets != ignore_index
    g_logp, g_ent, g_kl = (None if g is None else torch.where(valid, g.float(), 0.0) for g in grads)
    c = 1.0 / (s_p * temperature)
    alpha = g_kl * (log_s_q - log_s_p - kl) - g_logp
    dz = zr.mul_((g_kl * c)[:, None])
    if g_ent is not None:
        alpha = alpha + g_ent * (log_s_p - entropy)
        dz.add_(z.mul_((-g_ent * c)[:, None]))
    dz.add_((alpha * c)[:, None]).mul_(e[: dz.shape[0]])
    safe = torch.where(valid, targets, 0).long()[:, None]
    return dz.scatter_add_(-1, safe, (g_logp / temperature)[:, None])


def kl_over(chunks, n: int, device):
    """row_stats over (rows, [z, zr]) chunks covering N rows -> (kl (N,), stats (5, N)), fp32."""
    kl = torch.empty(n, dtype=torch.float32, device=device)
    stats = torch.empty(5, n, dtype=torch.float32, device=device)
    scratch = None
    for rows, (z, zr) in chunks:
        if scratch is None:
            scratch = torch.empty_like(z)
        kl[rows], stats[:, rows] = row_stats(z, zr, scratch)
    return kl, stats


def grads_over(chunks, stats, kl, grad_kl, temperature: float):
    """Yield (rows, d KL / d(logits) fp32) for each (rows, [z, zr]) chunk; grad_z_ overwrites z and zr."""
    scratch = None
    for rows, (z, zr) in chunks:
        if scratch is None:
            scratch = torch.empty_like(z)
        yield rows, grad_z_(z, zr, stats[:, rows], kl[rows], grad_kl[rows], temperature, scratch)


def forward(logits, ref_logits, temperature: float, chunk_rows: int | None = None):
    """logits, ref_logits (N, V) -> (kl (N,), stats (5, N)), fp32."""
    return kl_over(logits_chunks((logits, ref_logits), temperature, chunk_rows), logits.shape[0], logits.device)


def backward(grad_kl, logits, ref_logits, stats, kl, temperature: float, need_ref: bool,
             chunk_rows: int | None = None):
    """Returns (d logits, d ref_logits or None), in the inputs' dtypes."""
    d_logits = torch.empty_like(logits)
    d_ref = torch.empty_like(ref_logits) if need_ref else None
    scratch = None
    for rows, (z, zr) in logits_chunks((logits, ref_logits), temperature, chunk_rows):
        if scratch is None:
            scratch = torch.empty_like(z)
        st = stats[:, rows]
        d_logits[rows] = grad_z_(z, zr, st, kl[rows], grad_kl[rows], temperature, scratch)
        if need_ref:
            # grad_z_ left x_q = zr - m_q in zr and e_p = exp(z - m_p) in scratch: (q - p) grad / T
            q = zr.sub_(st[3][:, None]).exp_()
            p = scratch[: q.shape[0]].mul_(torch.exp(-st[1])[:, None])
            d_ref[rows] = q.sub_(p).mul_((grad_kl[rows].float() / temperature)[:, None])
    return d_logits, d_ref


class _KLDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, temperature):
        kl, stats = forward(logits, ref_logits, temperature)
        ctx.save_for_backward(logits, ref_logits, stats, kl)
        ctx.temperature = temperature
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        logits, ref_logits, stats, kl = ctx.saved_tensors
        d_logits, d_ref = backward(grad_kl, logits, ref_logits, stats, kl, ctx.temperature,
                                   ctx.needs_input_grad[1])
        return d_logits, d_ref, None


def kl_divergence(logits, ref_logits, *, temperature=1.0):
    """Reference twin of rlhf_fast.kl_divergence (see its docstring for the contract)."""
    validate(logits, ref_logits, temperature)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    kl = _KLDivergence.apply(logits.reshape(-1, vocab), ref_logits.reshape(-1, vocab), float(temperature))
    return kl.reshape(lead)
