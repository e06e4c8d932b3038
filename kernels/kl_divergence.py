"""Triton kernels for kl_divergence (the fused-linear version: kernels/fused_linear_kl_divergence.py).

Row kernels: one program per row, one pass over both rows of logits, keeping online (max, sum-exp)
for p and q plus s_d = sum e^(zp - m_p) ((zp - m_p) - (zq - m_q)), so with mean = s_d / s_p (the
p-weighted mean of y = (zp - m_p) - (zq - m_q)) KL = mean - log s_p + log s_q. The backward recomputes
p = e^((zp - m_p) - log s_p) and forms d(KL)/d(zp) = p (y - mean), equal to p (log p - log q - KL) in
exact arithmetic. In fp32 the row constant is what matters: its error e adds e * sum_v p_v w_v to every
element of d(hidden) (a systematic error, unlike the per-element roundings, which average out), so it
must match the backward's own sum_v p y to well below an ulp of the log-sum-exps. Hence mean (not
KL = mean - log s_p + log s_q, whose fp32 log s terms round differently from the backward's per-element
log p, log q), and s_p, s_d summed in fp64 (row scalars and tile sums only; the tiles stay fp32): with
fp32 sums the kernel's d(hidden) reached 2x PyTorch's fp32 error (fused-linear op, V = 1000, T = 0.7).

"""

import triton
import triton.language as tl

from ._online_softmax import _kl_online_update
from ._row_configs import CONFIGS, TUNING_SETS, RowConfig, tuning_set  # noqa: F401 - the launchers' and CI's
from ._spec import KernelSpec

@triton.jit
def _kl_fwd_kernel(p_ptr, q_ptr, kl_ptr, stats_ptr, stride_p, stride_q, V, temp, BLOCK_V: tl.constexpr):
    """kl (N,), stats (5, N) = (m_p, log s_p, m_q, log s_q, mean = s_d / s_p)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    m_p = tl.full((), float("-inf"), tl.float32)
    m_q = tl.full((), float("-inf"), tl.float32)
    s_p = tl.zeros((), tl.float64)
    s_q = tl.zeros((), tl.float32)
    s_d = tl.zeros((), tl.float64)
    for off in range(0, V, BLOCK_V):
        mask = off + cols < V
        zp = tl.math.div_rn(tl.load(p_ptr + row * stride_p + off + cols, mask=mask, other=float("-inf")).to(
            tl.float32), temp)
        zq = tl.math.div_rn(tl.load(q_ptr + row * stride_q + off + cols, mask=mask, other=float("-inf")).to(
            tl.float32), temp)
        m_p, m_q, s_p, s_q, s_d = _kl_online_update(zp, zq, mask, m_p, m_q, s_p, s_q, s_d, 0)
    log_s_p = tl.log(s_p.to(tl.float32))
    log_s_q = tl.log(s_q)
    mean = s_d / s_p
    n_rows = tl.num_programs(0)
    tl.store(stats_ptr + row, m_p)
    tl.store(stats_ptr + n_rows + row, log_s_p)
    tl.store(stats_ptr + 2 * n_rows + row, m_q)
    tl.store(stats_ptr + 3 * n_rows + row, log_s_q)
    tl.store(stats_ptr + 4 * n_rows + row, mean.to(tl.float32))
    tl.store(kl_ptr + row, (mean - log_s_p + log_s_q).to(tl.float32))


@triton.jit
def _kl_bwd_kernel(p_ptr, q_ptr, stats_ptr, g_ptr, dp_ptr, dq_ptr, stride_p, stride_q, V, temp,
                   NEED_REF: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n_rows = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_V)
    m_p = tl.load(stats_ptr + row)
    log_s_p = tl.load(stats_ptr + n_rows + row)
    m_q = tl.load(stats_ptr + 2 * n_rows + row)
    log_s_q = tl.load(stats_ptr + 3 * n_rows + row)
    mean = tl.load(stats_ptr + 4 * n_rows + row)
    g = tl.math.div_rn(tl.load(g_ptr + row), temp)
    for off in range(0, V, BLOCK_V):
        mask = off + cols < V
        zp = tl.math.div_rn(tl.load(p_ptr + row * stride_p + off + cols, mask=mask, other=0.0).to(tl.float32), temp)
        zq = tl.math.div_rn(tl.load(q_ptr + row * stride_q + off + cols, mask=mask, other=0.0).to(tl.float32), temp)
        logp = (zp - m_p) - log_s_p
        logq = (zq - m_q) - log_s_q
        p = tl.exp(logp)
        # -inf logit (p = 0): zero gradient, as the reference's mask; a NaN row stays NaN
        dp = tl.where(logp == float("-inf"), 0.0, g * p * ((zp - m_p) - (zq - m_q) - mean))
        tl.store(dp_ptr + row * stride_p + off + cols, dp.to(dp_ptr.dtype.element_ty), mask=mask)
        if NEED_REF:
            tl.store(dq_ptr + row * stride_q + off + cols, (g * (tl.exp(logq) - p)).to(dq_ptr.dtype.element_ty),
                     mask=mask)


_DTYPES = ("fp32", "bf16", "fp16")


def static_configs():
    specs = []
    for dt, rdt in ((a, b) for a in _DTYPES for b in _DTYPES):
        for cfg in dict.fromkeys(c for configs in TUNING_SETS.values() for c in configs):
            specs.append(KernelSpec(
                f"kl_fwd[{dt},{rdt},BV={cfg.block_v},w{cfg.num_warps}]", _kl_fwd_kernel,
                {"p_ptr": f"*{dt}", "q_ptr": f"*{rdt}", "kl_ptr": "*fp32", "stats_ptr": "*fp32",
                 "stride_p": "i32", "stride_q": "i32", "V": "i32", "temp": "fp32", "BLOCK_V": "constexpr"},
                {"BLOCK_V": cfg.block_v}, cfg.num_warps, cfg.num_stages))
            for need_ref in (False, True):
                specs.append(KernelSpec(
                    f"kl_bwd[{dt},{rdt},BV={cfg.block_v},w{cfg.num_warps},REF={need_ref}]", _kl_bwd_kernel,
                    {"p_ptr": f"*{dt}", "q_ptr": f"*{rdt}", "stats_ptr": "*fp32",
                     "g_ptr": "*fp32", "dp_ptr": f"*{dt}", "dq_ptr": f"*{rdt}", "stride_p": "i32",
                     "stride_q": "i32", "V": "i32", "temp": "fp32", "NEED_REF": "constexpr",
                     "BLOCK_V": "constexpr"},
                    {"BLOCK_V": cfg.block_v, "NEED_REF": need_ref}, cfg.num_warps, cfg.num_stages))
    return specs
