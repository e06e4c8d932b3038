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


def row_stats(z: torch.Tensor, zr: torch.Tensor):
    """z, zr (n, V) fp32 (already / T) -> (kl (n,), stats (5, n) = (m_p, log s_p, m_q, log s_q, mean)).

    As in token_logprobs, log p = (z - m) - log s (never z - lse) keeps every log-probability exact to
    its own ulp; KL is then sum p (log p - log q), the formula PyTorch uses. mean = sum p ((z - m_p) -
    (zr - m_q)) = KL + log s_p - log s_q is the row constant of the Triton backward
    (kernels/kl_divergence.py); it is stored here only so that both backends' stats have one layout
    (this backward uses KL with its own log p, log q, which row_stats summed).
    """
    m_p, m_q = z.max(-1).values, zr.max(-1).values
    log_p = z - m_p[:, None]
    log_q = zr - m_q[:, None]
    log_s_p = torch.log(log_p.exp().sum(-1))
    log_s_q = torch.log(log_q.exp().sum(-1))
    log_p.sub_(log_s_p[:, None])
    log_q.sub_(log_s_q[:, None])
    # p = 0 terms (-inf logits) contribute 0, as in torch.distributions (not 0 * (-inf - -inf) = NaN)
    kl = (log_p.exp() * (log_p - log_q)).masked_fill_(log_p.isneginf(), 0.0).sum(-1)
    mean = kl + (log_s_p - log_s_q)
    return kl, torch.stack([m_p, log_s_p, m_q, log_s_q, mean])


def grads_(z, zr, stats, kl, grad_kl, temperature: float, need_ref: bool):
    """Overwrite z (and zr when need_ref) with d/d(logits) (and d/d(ref_logits)); returns (dz, dzr or None)."""
    g = grad_kl.float()[:, None]
    z.sub_(stats[0][:, None]).sub_(stats[1][:, None])     # log p
    zr.sub_(stats[2][:, None]).sub_(stats[3][:, None])    # log q
    diff = (z - zr).sub_(kl[:, None]).masked_fill_(z.isneginf(), 0.0)  # p = 0: zero gradient
    z.exp_()                                              # p
    dzr = None
    if need_ref:
        dzr = zr.exp_().sub_(z).mul_(g)                   # (q - p) g
        if temperature != 1.0:
            dzr.div_(temperature)
    dz = z.mul_(diff).mul_(g)
    if temperature != 1.0:
        dz.div_(temperature)
    return dz, dzr


def kl_over(chunks, n: int, device):
    """row_stats over (rows, [z, zr]) chunks covering N rows -> (kl (N,), stats (5, N)), fp32."""
    kl = torch.empty(n, dtype=torch.float32, device=device)
    stats = torch.empty(5, n, dtype=torch.float32, device=device)
    for rows, (z, zr) in chunks:
        kl[rows], stats[:, rows] = row_stats(z, zr)
    return kl, stats


def grads_over(chunks, stats, kl, grad_kl, temperature: float, need_ref: bool):
    """Yield (rows, dz, dzr or None) for each (rows, [z, zr]) chunk; grads_ overwrites the chunk's z, zr."""
    for rows, (z, zr) in chunks:
        yield rows, *grads_(z, zr, stats[:, rows], kl[rows], grad_kl[rows], temperature, need_ref)


def forward(logits, ref_logits, temperature: float, chunk_rows: int | None = None):
    """logits, ref_logits (N, V) -> (kl (N,), stats (5, N)), fp32."""
    return kl_over(logits_chunks((logits, ref_logits), temperature, chunk_rows), logits.shape[0], logits.device)


def backward(grad_kl, logits, ref_logits, stats, kl, temperature: float, need_ref: bool,
             chunk_rows: int | None = None):
    """Returns (d logits, d ref_logits or None), in the inputs' dtypes."""
    d_logits = torch.empty_like(logits)
    d_ref = torch.empty_like(ref_logits) if need_ref else None
    for rows, dz, dzr in grads_over(logits_chunks((logits, ref_logits), temperature, chunk_rows), stats, kl,
                                    grad_kl, temperature, need_ref):
        d_logits[rows] = dz
        if need_ref:
            d_ref[rows] = dzr
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
