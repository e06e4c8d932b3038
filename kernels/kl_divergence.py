"""Triton kernels for kl_divergence and fused_linear_kl_divergence.

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

Fused-linear kernels: the same statistics over (BLOCK_N, BLOCK_V) tiles of both models' logits,
computed with tl.dot on chip (see kernels/fused_linear_logprobs.py for the tiling and the two backward
variants: atomic, and reduce without atomics).
"""
from collections import namedtuple

import triton
import triton.language as tl

from ._online_softmax import _nan_max, _online_lse_step, _rebased_sum
from ._spec import KernelSpec
from .fused_linear_logprobs import (DOT_PRECISION, NEED_PAIRS, TileConfig, _grad_products, _logits_tile,
                                    _reduce_steps, _reduce_tile, reduce_specs)

RowConfig = namedtuple("RowConfig", "block_v num_warps num_stages")
# The launcher picks the first config whose block_v covers V, else the last one (looping over tiles).
CONFIGS = (RowConfig(1024, 4, 2), RowConfig(4096, 8, 2))
# Fused-linear KL tiles, per input dtype: half the vocab width of fused_linear_logprobs' tiles, since
# both models' logit tiles are live at once (the wider tile spills on sm_80); fp32 (FMA-path dots)
# takes 16 rows: 32 rows spilled a few bytes on sm_80 or sm_90 under Triton 3.6 or 3.9, 16 does not.
FUSED_CONFIGS = {
    "fp32": TileConfig(16, 32, 32, 4, 2),
    "bf16": TileConfig(64, 64, 64, 8, 3),
    "fp16": TileConfig(64, 64, 64, 8, 3),
}
# The forward's tiles: FUSED_CONFIGS' (the backward recomputes the same logit tiles) but one stage for
# fp32, whose fp64 row sums (module docstring) spilled 20 B on sm_90 with 2 stages (Triton 3.9).
FUSED_FWD_CONFIGS = {**FUSED_CONFIGS, "fp32": FUSED_CONFIGS["fp32"]._replace(num_stages=1)}
# The reduce backward's (dx pass, dw pass) tiles (see fused_linear_logprobs.REDUCE_CONFIGS); the fp32
# dw pass takes 8 warps: with 4 it spilled 8 B on sm_80 (Triton 3.9).
FUSED_REDUCE_CONFIGS = {
    "fp32": (TileConfig(16, 32, 32, 4, 2), TileConfig(16, 32, 32, 8, 2)),
    "bf16": (TileConfig(64, 64, 32, 8, 3), TileConfig(64, 64, 32, 8, 3)),
    "fp16": (TileConfig(64, 64, 32, 8, 3), TileConfig(64, 64, 32, 8, 3)),
}


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
def _kl_online_update(zp, zq, mask, m_p, m_q, s_p, s_q, s_d, AXIS: tl.constexpr):
    """Fold one tile (-inf on masked lanes) into the running (m_p, m_q, s_p = sum e^(zp - m_p), s_q, s_d),
    along AXIS; s_p and s_d are fp64 (see the module docstring), the rest fp32.

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


@triton.jit
def _fused_linear_kl_divergence_fwd_kernel(x_ptr, w_ptr, b_ptr, xr_ptr, wr_ptr, br_ptr, part_ptr, N, V, H, HR,
                                           stride_x, stride_w, stride_xr, stride_wr, temp, tiles_per_split,
                                           has_bias, has_ref_bias, BLOCK_N: tl.constexpr,
                                           BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                                           DOT_PRECISION: tl.constexpr):
    """part (5, splits, N) <- per split: m_p, s_p, s_d, m_q, s_q as in _kl_online_update."""
    split = tl.program_id(1)
    row0 = tl.program_id(0) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    m_p = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_q = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_p = tl.zeros((BLOCK_N,), tl.float64)
    s_q = tl.zeros((BLOCK_N,), tl.float32)
    s_d = tl.zeros((BLOCK_N,), tl.float64)
    v_begin = split * tiles_per_split * BLOCK_V
    for i in range(0, tiles_per_split):
        col0 = v_begin + i * BLOCK_V
        col_mask = col0 + tl.arange(0, BLOCK_V) < V
        zp = _logits_tile(x_ptr, w_ptr, b_ptr, row0, col0, N - row0, V - col0, H, stride_x, stride_w, temp,
                          has_bias, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        zq = _logits_tile(xr_ptr, wr_ptr, br_ptr, row0, col0, N - row0, V - col0, HR, stride_xr, stride_wr,
                          temp, has_ref_bias, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        valid = col_mask[None, :]
        zp = tl.where(valid, zp, float("-inf"))
        zq = tl.where(valid, zq, float("-inf"))
        m_p, m_q, s_p, s_q, s_d = _kl_online_update(zp, zq, valid, m_p, m_q, s_p, s_q, s_d, 1)
    stride_part = tl.num_programs(1) * N
    out = part_ptr + split * N + rows
    tl.store(out, m_p, mask=row_mask)
    tl.store(out + stride_part, s_p, mask=row_mask)
    tl.store(out + 2 * stride_part, s_d, mask=row_mask)
    tl.store(out + 3 * stride_part, m_q, mask=row_mask)
    tl.store(out + 4 * stride_part, s_q, mask=row_mask)


@triton.jit
def _kl_dlogits(x_ptr, w_ptr, b_ptr, xr_ptr, wr_ptr, br_ptr, stats_ptr, g_ptr, row0, col0, N, v_end, H,
                HR, stride_x, stride_w, stride_xr, stride_wr, temp, has_bias, has_ref_bias,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """d(KL)/d(logits) = g p ((zp - m_p) - (zq - m_q) - mean) / T for the (BLOCK_N, BLOCK_V) tile at
    (row0, col0), fp32, zero outside rows < N and cols < v_end (policy side only; module docstring)."""
    rows = row0 + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    col_mask = col0 + tl.arange(0, BLOCK_V) < v_end
    zp = _logits_tile(x_ptr, w_ptr, b_ptr, row0, col0, N - row0, v_end - col0, H, stride_x, stride_w, temp,
                      has_bias, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
    zq = _logits_tile(xr_ptr, wr_ptr, br_ptr, row0, col0, N - row0, v_end - col0, HR, stride_xr, stride_wr,
                      temp, has_ref_bias, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
    m_p = tl.load(stats_ptr + rows, mask=row_mask, other=0.0)
    log_s_p = tl.load(stats_ptr + N + rows, mask=row_mask, other=0.0)
    m_q = tl.load(stats_ptr + 2 * N + rows, mask=row_mask, other=0.0)
    mean = tl.load(stats_ptr + 4 * N + rows, mask=row_mask, other=0.0)
    yp = zp - m_p[:, None]
    logp = yp - log_s_p[:, None]
    g = tl.math.div_rn(tl.load(g_ptr + rows, mask=row_mask, other=0.0), temp)
    p = tl.exp(logp)
    d = tl.where(logp == float("-inf"), 0.0, g[:, None] * p * ((yp - (zq - m_q[:, None])) - mean[:, None]))
    return tl.where(row_mask[:, None] & col_mask[None, :], d, 0.0)


@triton.jit
def _fused_linear_kl_divergence_bwd_kernel(x_ptr, w_ptr, b_ptr, xr_ptr, wr_ptr, br_ptr, stats_ptr, g_ptr,
                                           dx_ptr, dw_ptr, db_ptr, N, V, H, HR, v_begin, v_end,
                                           stride_x, stride_w, stride_xr, stride_wr, stride_dx, stride_dw,
                                           temp, has_bias, has_ref_bias, need_b, NEED_X: tl.constexpr,
                                           NEED_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                                           BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Atomic backward, vocab slice [v_begin, v_end): one (token block, vocab tile) per program."""
    row0 = tl.program_id(0) * BLOCK_N
    col0 = v_begin + tl.program_id(1) * BLOCK_V
    d = _kl_dlogits(x_ptr, w_ptr, b_ptr, xr_ptr, wr_ptr, br_ptr, stats_ptr, g_ptr, row0, col0, N, v_end,
                    H, HR, stride_x, stride_w, stride_xr, stride_wr, temp, has_bias, has_ref_bias, BLOCK_N,
                    BLOCK_V, BLOCK_K, DOT_PRECISION)
    _grad_products(d, x_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr, row0, col0, N - row0, v_end - col0, v_begin, H,
                   stride_x, stride_w, stride_dx, stride_dw, need_b, NEED_X, NEED_W, BLOCK_N, BLOCK_V, BLOCK_K,
                   DOT_PRECISION, False)


@triton.jit
def _fused_linear_kl_divergence_bwd_reduce_kernel(x_ptr, w_ptr, b_ptr, xr_ptr, wr_ptr, br_ptr, stats_ptr,
                                                  g_ptr, dx_ptr, dw_ptr, db_ptr, N, V, H, HR, v_begin, v_end,
                                                  stride_x, stride_w, stride_xr, stride_wr, stride_dx, stride_dw,
                                                  temp, has_bias, has_ref_bias, need_b, OWN_COLS: tl.constexpr,
                                                  NEED_X: tl.constexpr, NEED_W: tl.constexpr,
                                                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                                                  BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Backward without atomics (as _fused_linear_logprobs_bwd_reduce_kernel): OWN_COLS=False walks the
    vocab for BLOCK_N tokens and writes dx; OWN_COLS=True walks the tokens for BLOCK_V vocab rows and
    writes dw, db."""
    for i in range(0, _reduce_steps(N, v_begin, v_end, OWN_COLS, BLOCK_N, BLOCK_V)):
        row0, col0 = _reduce_tile(i, v_begin, OWN_COLS, BLOCK_N, BLOCK_V)
        d = _kl_dlogits(x_ptr, w_ptr, b_ptr, xr_ptr, wr_ptr, br_ptr, stats_ptr, g_ptr, row0, col0, N,
                        v_end, H, HR, stride_x, stride_w, stride_xr, stride_wr, temp, has_bias, has_ref_bias,
                        BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        _grad_products(d, x_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr, row0, col0, N - row0, v_end - col0, v_begin, H,
                       stride_x, stride_w, stride_dx, stride_dw, need_b, NEED_X, NEED_W, BLOCK_N, BLOCK_V,
                       BLOCK_K, DOT_PRECISION, True)
        # the next step re-reads the dx/dw rows this step wrote, maybe from other threads of the block
        # (another layout, or an async copy): a block barrier orders those global accesses
        tl.debug_barrier()


_DTYPES = ("fp32", "bf16", "fp16")


def _fused_specs():
    specs = []
    for dt, cfg in FUSED_CONFIGS.items():
        fwd_cfg = FUSED_FWD_CONFIGS[dt]
        cx = {"BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_K": cfg.block_k,
              "DOT_PRECISION": DOT_PRECISION[dt]}
        tag = f"{dt},BN={cfg.block_n},BV={cfg.block_v},BK={cfg.block_k}"
        ptrs = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "xr_ptr": f"*{dt}", "wr_ptr": f"*{dt}",
                "br_ptr": f"*{dt}"}
        specs.append(KernelSpec(
            f"fused_linear_kl_fwd[{tag}]", _fused_linear_kl_divergence_fwd_kernel,
            {**ptrs, "part_ptr": "*fp32", "N": "i32", "V": "i32", "H": "i32", "HR": "i32", "stride_x": "i32",
             "stride_w": "i32", "stride_xr": "i32", "stride_wr": "i32", "temp": "fp32", "tiles_per_split": "i32",
             "has_bias": "i32", "has_ref_bias": "i32", **{k: "constexpr" for k in cx}},
            cx, fwd_cfg.num_warps, fwd_cfg.num_stages))
        bwd_sig = {**ptrs, "stats_ptr": "*fp32", "g_ptr": "*fp32",
                   "dx_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32", "N": "i32", "V": "i32", "H": "i32",
                   "HR": "i32", "v_begin": "i32", "v_end": "i32", "stride_x": "i32", "stride_w": "i32",
                   "stride_xr": "i32", "stride_wr": "i32", "stride_dx": "i32", "stride_dw": "i32",
                   "temp": "fp32", "has_bias": "i32", "has_ref_bias": "i32", "need_b": "i32",
                   "NEED_X": "constexpr", "NEED_W": "constexpr", **{k: "constexpr" for k in cx}}
        for need_x, need_w in NEED_PAIRS:
            specs.append(KernelSpec(
                f"fused_linear_kl_bwd[{tag},X={need_x},W={need_w}]", _fused_linear_kl_divergence_bwd_kernel,
                bwd_sig, {**cx, "NEED_X": need_x, "NEED_W": need_w}, cfg.num_warps, cfg.num_stages))
        specs += reduce_specs("fused_linear_kl_bwd_reduce", _fused_linear_kl_divergence_bwd_reduce_kernel, bwd_sig,
                              dt, FUSED_REDUCE_CONFIGS[dt])
    return specs


def static_configs():
    specs = []
    for dt, rdt in ((a, b) for a in _DTYPES for b in _DTYPES):
        for cfg in CONFIGS:
            specs.append(KernelSpec(
                f"kl_fwd[{dt},{rdt},BV={cfg.block_v}]", _kl_fwd_kernel,
                {"p_ptr": f"*{dt}", "q_ptr": f"*{rdt}", "kl_ptr": "*fp32", "stats_ptr": "*fp32",
                 "stride_p": "i32", "stride_q": "i32", "V": "i32", "temp": "fp32", "BLOCK_V": "constexpr"},
                {"BLOCK_V": cfg.block_v}, cfg.num_warps, cfg.num_stages))
            for need_ref in (False, True):
                specs.append(KernelSpec(
                    f"kl_bwd[{dt},{rdt},BV={cfg.block_v},REF={need_ref}]", _kl_bwd_kernel,
                    {"p_ptr": f"*{dt}", "q_ptr": f"*{rdt}", "stats_ptr": "*fp32",
                     "g_ptr": "*fp32", "dp_ptr": f"*{dt}", "dq_ptr": f"*{rdt}", "stride_p": "i32",
                     "stride_q": "i32", "V": "i32", "temp": "fp32", "NEED_REF": "constexpr",
                     "BLOCK_V": "constexpr"},
                    {"BLOCK_V": cfg.block_v, "NEED_REF": need_ref}, cfg.num_warps, cfg.num_stages))
    return specs + _fused_specs()
