"""Triton kernels for kl_divergence: one program per row, one pass over both rows of logits.

Forward keeps online (max, sum-exp) for p and q plus sum(exp(zp - m) (zp - zq)), so
KL = E_p[zp - zq] - lse_p + lse_q. Backward recomputes p and q from the saved lse's.
"""
from collections import namedtuple

import triton
import triton.language as tl

from ._spec import KernelSpec

RowConfig = namedtuple("RowConfig", "block_v num_warps num_stages")
# The launcher picks the first config whose block_v covers V, else the last one (looping over tiles).
CONFIGS = (RowConfig(1024, 4, 2), RowConfig(4096, 8, 2))


@triton.jit
def _kl_fwd_kernel(p_ptr, q_ptr, kl_ptr, lse_p_ptr, lse_q_ptr, stride_p, stride_q, V, inv_t,
                   BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    m_p = tl.full((), float("-inf"), tl.float32)
    m_q = tl.full((), float("-inf"), tl.float32)
    s_p = tl.zeros((), tl.float32)
    s_q = tl.zeros((), tl.float32)
    s_d = tl.zeros((), tl.float32)
    for off in range(0, V, BLOCK_V):
        mask = off + cols < V
        zp = tl.load(p_ptr + row * stride_p + off + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        zq = tl.load(q_ptr + row * stride_q + off + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        mp_new = tl.maximum(m_p, tl.max(zp, 0))
        mq_new = tl.maximum(m_q, tl.max(zq, 0))
        alpha = tl.exp(m_p - mp_new)
        e = tl.exp(zp - mp_new)
        s_p = s_p * alpha + tl.sum(e, 0)
        s_d = s_d * alpha + tl.sum(tl.where(mask, e * (zp - zq), 0.0), 0)
        s_q = s_q * tl.exp(m_q - mq_new) + tl.sum(tl.exp(zq - mq_new), 0)
        m_p = mp_new
        m_q = mq_new
    lse_p = m_p + tl.log(s_p)
    lse_q = m_q + tl.log(s_q)
    tl.store(lse_p_ptr + row, lse_p)
    tl.store(lse_q_ptr + row, lse_q)
    tl.store(kl_ptr + row, s_d / s_p - lse_p + lse_q)


@triton.jit
def _kl_bwd_kernel(p_ptr, q_ptr, lse_p_ptr, lse_q_ptr, kl_ptr, g_ptr, dp_ptr, dq_ptr, stride_p, stride_q, V,
                   inv_t, NEED_REF: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    lse_p = tl.load(lse_p_ptr + row)
    lse_q = tl.load(lse_q_ptr + row)
    kl = tl.load(kl_ptr + row)
    g = tl.load(g_ptr + row) * inv_t
    for off in range(0, V, BLOCK_V):
        mask = off + cols < V
        logp = tl.load(p_ptr + row * stride_p + off + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_p
        logq = tl.load(q_ptr + row * stride_q + off + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_q
        p = tl.exp(logp)
        tl.store(dp_ptr + row * stride_p + off + cols, (g * p * (logp - logq - kl)).to(dp_ptr.dtype.element_ty),
                 mask=mask)
        if NEED_REF:
            tl.store(dq_ptr + row * stride_q + off + cols, (g * (tl.exp(logq) - p)).to(dq_ptr.dtype.element_ty),
                     mask=mask)


_DTYPES = ("fp32", "bf16", "fp16")


def static_configs():
    specs = []
    for dt, rdt in ((a, b) for a in _DTYPES for b in _DTYPES):
        for cfg in CONFIGS:
            specs.append(KernelSpec(
                f"kl_fwd[{dt},{rdt},BV={cfg.block_v}]", _kl_fwd_kernel,
                {"p_ptr": f"*{dt}", "q_ptr": f"*{rdt}", "kl_ptr": "*fp32", "lse_p_ptr": "*fp32", "lse_q_ptr": "*fp32",
                 "stride_p": "i32", "stride_q": "i32", "V": "i32", "inv_t": "fp32", "BLOCK_V": "constexpr"},
                {"BLOCK_V": cfg.block_v}, cfg.num_warps, cfg.num_stages))
            for need_ref in (False, True):
                specs.append(KernelSpec(
                    f"kl_bwd[{dt},{rdt},BV={cfg.block_v},REF={need_ref}]", _kl_bwd_kernel,
                    {"p_ptr": f"*{dt}", "q_ptr": f"*{rdt}", "lse_p_ptr": "*fp32", "lse_q_ptr": "*fp32",
                     "kl_ptr": "*fp32", "g_ptr": "*fp32", "dp_ptr": f"*{dt}", "dq_ptr": f"*{rdt}", "stride_p": "i32",
                     "stride_q": "i32", "V": "i32", "inv_t": "fp32", "NEED_REF": "constexpr",
                     "BLOCK_V": "constexpr"},
                    {"BLOCK_V": cfg.block_v, "NEED_REF": need_ref}, cfg.num_warps, cfg.num_stages))
    return specs
