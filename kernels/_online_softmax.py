"""Online softmax statistics over vocab tiles, shared by the token_logprobs, fused_linear_logprobs and
kl_divergence kernels (a helper module: no kernels, no static_configs).

A row's logits z arrive tile by tile; the kernels keep a running max m and s = sum e^(z - m) (so
lse = m + log s), plus sums of e^(z - m) w that stay relative to m (entropy: w = z - m; KL:
w = log p - log q up to the maxima), and re-base all of them when m grows.
"""
import triton
import triton.language as tl


@triton.jit
def _online_lse_step(z, m, s, AXIS: tl.constexpr):
    """Fold tile z (fp32, -inf on masked lanes) into the running max m and s = sum e^(z - m) along AXIS
    (the tile is summed in s's dtype: fp32, or fp64 where a kernel keeps its row sums in fp64).

    Returns (m_new, s_new, alpha, y, e): alpha = e^(m - m_new) rescales sums taken relative to the old
    max; y = z - m_new and e = e^y, both 0 where z = -inf (masked lanes and masked vocabulary: p = 0 and
    0 log 0 = 0). A leading tile of only -inf leaves m at -inf without turning s into NaN.

    NaN propagates as in PyTorch's max: a NaN logit makes m (hence s, alpha, y, e and every statistic
    built on them) NaN for its row from that tile on. tl.max/tl.maximum alone would drop it (fmax
    semantics on GPU), and `live` below would zero its term, turning a NaN row into finite numbers.
    """
    m_new = _nan_max(m, z, AXIS)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    live = z > float("-inf")
    if AXIS == 0:
        y = tl.where(live, z - m_safe, 0.0)
    else:
        y = tl.where(live, z - m_safe[:, None], 0.0)
    e = tl.where(live, tl.exp(y), 0.0)
    return m_new, s * alpha + tl.sum(e.to(s.dtype), AXIS), alpha, y, e


@triton.jit
def _nan_max(m, z, AXIS: tl.constexpr):
    """max(m, max of z along AXIS), NaN where m or any z of the row is NaN (torch.max semantics)."""
    nan_term = tl.sum(tl.where(z != z, z, 0.0), AXIS)  # NaN where the row holds a NaN, else 0
    return tl.maximum(m, tl.max(z, AXIS), propagate_nan=tl.PropagateNan.ALL) + nan_term


@triton.jit
def _rebased_sum(acc, s, alpha, shift, terms, AXIS: tl.constexpr):
    """Running acc = sum e^(z - m) w with the new tile's terms e * w added along AXIS (summed in acc's
    dtype).

    acc and s = sum e^(z - m) are the old running sums; when the maxima grow each old w moves by
    `shift` (entropy: m - m_new) and each old e^(z - m) by alpha (from _online_lse_step).
    """
    return alpha * (acc + tl.where(s > 0, s * shift, 0.0)) + tl.sum(terms.to(acc.dtype), AXIS)


@triton.jit
def _kl_online_update(zp, zq, mask, m_p, m_q, s_p, s_q, s_d, AXIS: tl.constexpr):
    """Fold one tile (-inf on masked lanes) into the running (m_p, m_q, s_p = sum e^(zp - m_p), s_q, s_d),
    along AXIS; s_p and s_d are fp64 (see kernels/kl_divergence.py's docstring), the rest fp32.

    s_d = sum e^(zp - m_p) ((zp - m_p) - (zq - m_q)): relative to the running maxima, so it never holds
    lse-sized numbers. When a maximum grows, the old terms are rescaled and shifted by the change of
    (m_p - m_q), taken in fp64 (exact for fp32 maxima).
    """
    mq_new = _nan_max(m_q, zq, AXIS)
    mp_new, sp_new, alpha, yp, e = _online_lse_step(zp, m_p, s_p, AXIS)
    # q does not go through _online_lse_step: yq must keep its -inf where q = 0 (KL = inf if p > 0 there)
    mq_safe = tl.where(mq_new == float("-inf"), 0.0, mq_new)
    if AXIS == 0:
        yq = tl.where(mask, zq - mq_safe, 0.0)
    else:
        yq = tl.where(mask, zq - mq_safe[:, None], 0.0)
    # -inf logits (masked vocabulary) have p = 0 and add nothing, not 0 * inf
    terms = tl.where(mask & (zp > float("-inf")), e * (yp - yq), 0.0)
    shift = (m_p.to(tl.float64) - mp_new) - (m_q.to(tl.float64) - mq_new)
    s_d = _rebased_sum(s_d, s_p, alpha, shift, terms, AXIS)
    s_q = s_q * tl.exp(m_q - mq_safe) + tl.sum(tl.where(mask, tl.exp(yq), 0.0), AXIS)
    return mp_new, mq_new, sp_new, s_q, s_d
