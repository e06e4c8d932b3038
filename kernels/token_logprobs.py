"""Triton kernels for token_logprobs: one program per row, one pass over the vocab.

Forward: online max m, s = sum exp(z - m) and sy = sum exp(z - m) (z - m) over BLOCK_V tiles give
the row statistics (m, log s) (lse = m + log s) and the entropy H = log s - sy / s; the target logit
is one scalar load. Backward recomputes log p = (z - m) - log s and writes
d(logits) = (g_logp (onehot - p) - g_H p (log p + H)) / T in the logits' dtype.

HAS_CUTOFFS (a constexpr: without it the kernels are the plain ones): each row's kept set, token v kept iff
z_v > t or (z_v == t and v >= i) (CUTOFFS.md), arrives as (t fp32, i int32) per row. Both kernels decide
membership with one compare per logit on the same z; the forward sets dropped logits to -inf (the
statistics become those of the kept, renormalized distribution) and the backward writes d(logits) = 0
there.
"""

import triton
import triton.language as tl

from ._cutoffs import _dropped
from ._online_softmax import _online_lse_step, _rebased_sum
from ._row_configs import CONFIGS, TUNING_SETS, RowConfig, tuning_set  # noqa: F401 - the launchers' and CI's
from ._spec import KernelSpec

@triton.jit
def _token_logprobs_fwd_kernel(logits_ptr, targets_ptr, cut_t_ptr, cut_i_ptr, logp_ptr, entropy_ptr, stats_ptr,
                               stride_row, V, temp, ignore_index, WANT_ENTROPY: tl.constexpr,
                               HAS_CUTOFFS: tl.constexpr, BLOCK_V: tl.constexpr):
    """stats (2, N) <- (m, log s): log p = (z - m) - log s stays exact to an ulp of log p."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    sy = tl.zeros((), tl.float32)
    if HAS_CUTOFFS:
        cut_t = tl.load(cut_t_ptr + row)
        cut_i = tl.load(cut_i_ptr + row)
    for off in range(0, V, BLOCK_V):
        mask = off + cols < V
        z = tl.math.div_rn(tl.load(base + off + cols, mask=mask, other=float("-inf")).to(tl.float32), temp)
        if HAS_CUTOFFS:
            z = tl.where(_dropped(z, off + cols, cut_t, cut_i), float("-inf"), z)
        m_new, s_new, alpha, y, e = _online_lse_step(z, m, s, 0)
        if WANT_ENTROPY:
            sy = _rebased_sum(sy, s, alpha, m - m_new, e * y, 0)  # sy = sum exp(z - m) (z - m)
        m, s = m_new, s_new
    log_s = tl.log(s)
    t = tl.load(targets_ptr + row)
    valid = t != ignore_index
    zt = tl.math.div_rn(tl.load(base + t, mask=valid, other=0.0).to(tl.float32), temp)
    logp = (zt - m) - log_s
    if HAS_CUTOFFS:
        # a target off the kept set (or a -inf logit) has p = 0, also in a row that keeps nothing
        zt = tl.where(_dropped(zt, t, cut_t, cut_i), float("-inf"), zt)
        logp = tl.where(zt == float("-inf"), float("-inf"), logp)
    tl.store(stats_ptr + row, m)
    tl.store(stats_ptr + tl.num_programs(0) + row, log_s)
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    if WANT_ENTROPY:
        # H = log s - sy / s: no lse-sized terms cancel, so peaked rows keep their precision
        tl.store(entropy_ptr + row, tl.where(valid, log_s - sy / s, 0.0))


@triton.jit
def _token_logprobs_bwd_kernel(logits_ptr, targets_ptr, cut_t_ptr, cut_i_ptr, stats_ptr, entropy_ptr, g_logp_ptr,
                               g_ent_ptr, grad_ptr, stride_row, stride_grad, V, temp, ignore_index,
                               HAVE_ENTROPY: tl.constexpr, HAS_CUTOFFS: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    gbase = grad_ptr + row * stride_grad
    cols = tl.arange(0, BLOCK_V)
    t = tl.load(targets_ptr + row)
    valid = t != ignore_index
    m = tl.load(stats_ptr + row)
    log_s = tl.load(stats_ptr + tl.num_programs(0) + row)
    inv_temp = 1.0 / temp
    g_logp = tl.where(valid, tl.load(g_logp_ptr + row), 0.0)
    if HAVE_ENTROPY:
        g_ent = tl.where(valid, tl.load(g_ent_ptr + row), 0.0)
        ent = tl.load(entropy_ptr + row)
    if HAS_CUTOFFS:
        cut_t = tl.load(cut_t_ptr + row)
        cut_i = tl.load(cut_i_ptr + row)
    for off in range(0, V, BLOCK_V):
        mask = off + cols < V
        z = tl.math.div_rn(tl.load(base + off + cols, mask=mask, other=0.0).to(tl.float32), temp)
        logp = (z - m) - log_s
        p = tl.exp(logp)
        if HAVE_ENTROPY:
            d = -p * (g_logp + g_ent * (logp + ent))
        else:
            d = -p * g_logp
        # -inf logit (p = 0): zero gradient, not 0 * inf; NaN rows (NaN stats) stay NaN as in the reference
        d = tl.where(logp == float("-inf"), 0.0, d)
        d = tl.where(off + cols == t, d + g_logp, d) * inv_temp  # scales the result only: a multiply
        if HAS_CUTOFFS:
            d = tl.where(_dropped(z, off + cols, cut_t, cut_i), 0.0, d)  # also NaN of a row that keeps nothing
        tl.store(gbase + off + cols, d.to(grad_ptr.dtype.element_ty), mask=mask)


_DTYPES = ("fp32", "bf16", "fp16")


def static_configs():
    specs = []
    table_picks = {configs[0] for configs in TUNING_SETS.values()}
    for dt in _DTYPES:
        for cfg in dict.fromkeys(c for configs in TUNING_SETS.values() for c in configs):
            for flag in (False, True):
                # HAS_CUTOFFS launches take the table pick (no timing): only those are compiled with it
                for cut in (False, True) if cfg in table_picks else (False,):
                    # without cutoffs the launcher passes the fp32 stats buffer for both cut pointers
                    cut_sig = {"cut_t_ptr": "*fp32", "cut_i_ptr": "*i32" if cut else "*fp32"}
                    cx = {"BLOCK_V": cfg.block_v, "HAS_CUTOFFS": cut}
                    tag = f"{dt},BV={cfg.block_v},w{cfg.num_warps},ENT={flag}" + (",CUT=True" if cut else "")
                    specs.append(KernelSpec(
                        f"token_logprobs_fwd[{tag}]", _token_logprobs_fwd_kernel,
                        {"logits_ptr": f"*{dt}", "targets_ptr": "*i64", **cut_sig, "logp_ptr": "*fp32",
                         "entropy_ptr": "*fp32", "stats_ptr": "*fp32", "stride_row": "i32", "V": "i32",
                         "temp": "fp32", "ignore_index": "i32", "WANT_ENTROPY": "constexpr",
                         "HAS_CUTOFFS": "constexpr", "BLOCK_V": "constexpr"},
                        {**cx, "WANT_ENTROPY": flag}, cfg.num_warps, cfg.num_stages))
                    specs.append(KernelSpec(
                        f"token_logprobs_bwd[{tag}]", _token_logprobs_bwd_kernel,
                        {"logits_ptr": f"*{dt}", "targets_ptr": "*i64", **cut_sig, "stats_ptr": "*fp32",
                         "entropy_ptr": "*fp32", "g_logp_ptr": "*fp32", "g_ent_ptr": "*fp32", "grad_ptr": f"*{dt}",
                         "stride_row": "i32", "stride_grad": "i32", "V": "i32", "temp": "fp32",
                         "ignore_index": "i32", "HAVE_ENTROPY": "constexpr", "HAS_CUTOFFS": "constexpr",
                         "BLOCK_V": "constexpr"},
                        {**cx, "HAVE_ENTROPY": flag}, cfg.num_warps, cfg.num_stages))
    return specs
