"""Triton kernels for fused_linear_kl_divergence: exact KL(pi || pi_ref) from both models' hidden states
and lm_heads, the (BLOCK_N, BLOCK_V) tiles of both models' logits computed with tl.dot on chip and never
stored.

The statistics are kl_divergence's (kernels/kl_divergence.py: online max and sum-exp of p and q, and
s_d, folded by _online_softmax._kl_online_update, with fp64 row sums), over token x vocab tiles; the tiling
and the two backward variants (atomic, and reduce without atomics) are fused_linear_logprobs' (see
kernels/fused_linear_logprobs.py and the shared pieces in kernels/_fused_linear.py).
"""
import dataclasses

import triton
import triton.language as tl

from ._fused_linear import (CCE_BWD, CCE_FWD, NEED_PAIRS, TileConfig, _grad_products, _logits_tile,
                            _reduce_steps, _reduce_tile, reduce_specs, tile_constexprs)
from ._cutoffs import _dropped, _load_cut
from ._online_softmax import _kl_online_update
from ._spec import KernelSpec

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
# Tuning sets per input dtype, the table pick first (rlhf_fast/ops/_autotune.py times them). fp16/bf16 add
# cut-cross-entropy's tiles (kernels/_fused_linear.CCE_FWD, CCE_BWD) at half their vocab width, as the
# table halves fused_linear_logprobs' (two models' logit tiles are live at once); fp32 keeps the table pick.
_CCE_FWD = CCE_FWD._replace(block_v=CCE_FWD.block_v // 2)
_CCE_BWD = CCE_BWD._replace(block_v=CCE_BWD.block_v // 2)
FWD_TUNING_SETS = {dt: (cfg,) if dt == "fp32" else (cfg, _CCE_FWD) for dt, cfg in FUSED_FWD_CONFIGS.items()}
BWD_TUNING_SETS = {dt: (cfg,) if dt == "fp32" else (cfg, _CCE_BWD) for dt, cfg in FUSED_CONFIGS.items()}
REDUCE_TUNING_SETS = {dt: (pair,) if dt == "fp32" else (pair, (_CCE_BWD, _CCE_BWD))
                      for dt, pair in FUSED_REDUCE_CONFIGS.items()}


@triton.jit
def _kept(z, t, i, cols):
    """(BLOCK_N, BLOCK_V) bool: is token cols[v] in row n's kept set, for z the policy's tempered logits
    and (t, i) the rows' cutoffs. The contract's `z > t or (z == t and v >= i)` as
    `not (z < t or (z == t and v < i))`: a NaN logit stays in (its row turns NaN, as without cutoffs) and
    a NaN t keeps nothing (as the reference's `off_k`)."""
    return (_dropped(z, cols[None, :], t[:, None], i[:, None]) == 0) & (t == t)[:, None]


@triton.jit
def _fused_linear_kl_divergence_fwd_kernel(x_ptr, w_ptr, b_ptr, xr_ptr, wr_ptr, br_ptr, cut_t_ptr, cut_i_ptr,
                                           tgt_ptr, part_ptr, N, V, H, HR, stride_x, stride_w, stride_xr,
                                           stride_wr, temp, tiles_per_split, has_bias, has_ref_bias,
                                           BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                                           DOT_PRECISION: tl.constexpr, HAS_CUTOFFS: tl.constexpr,
                                           HAS_TARGETS: tl.constexpr):
    """part (5 or 7, splits, N) <- per split: m_p, s_p, s_d, m_q, s_q as in _kl_online_update, over the
    kept sets when HAS_CUTOFFS; then, when HAS_TARGETS, both models' tempered logits at the targets
    (0 in the splits that do not hold a row's target)."""
    split = tl.program_id(1)
    row0 = tl.program_id(0) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    m_p = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_q = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_p = tl.zeros((BLOCK_N,), tl.float64)
    s_q = tl.zeros((BLOCK_N,), tl.float32)
    s_d = tl.zeros((BLOCK_N,), tl.float64)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    zrt = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_TARGETS:
        tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    if HAS_CUTOFFS:
        cut_t, cut_i = _load_cut(cut_t_ptr, cut_i_ptr, rows, row_mask)
    v_begin = split * tiles_per_split * BLOCK_V
    for i in range(0, tiles_per_split):
        col0 = v_begin + i * BLOCK_V
        cols = col0 + tl.arange(0, BLOCK_V)
        zp = _logits_tile(x_ptr, w_ptr, b_ptr, row0, col0, N - row0, V - col0, H, stride_x, stride_w, temp,
                          has_bias, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        zq = _logits_tile(xr_ptr, wr_ptr, br_ptr, row0, col0, N - row0, V - col0, HR, stride_xr, stride_wr,
                          temp, has_ref_bias, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        if HAS_TARGETS:  # before the kept-set mask: the launcher decides the target's membership from zt
            hit = cols[None, :] == tgt[:, None]
            zt += tl.sum(tl.where(hit, zp, 0.0), 1)
            zrt += tl.sum(tl.where(hit, zq, 0.0), 1)
        valid = (cols < V)[None, :]
        if HAS_CUTOFFS:
            valid = valid & _kept(zp, cut_t, cut_i, cols)
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
    if HAS_TARGETS:
        tl.store(out + 5 * stride_part, zt, mask=row_mask)
        tl.store(out + 6 * stride_part, zrt, mask=row_mask)


@triton.jit
def _kl_dlogits(x_ptr, w_ptr, b_ptr, xr_ptr, wr_ptr, br_ptr, cut_t_ptr, cut_i_ptr, stats_ptr, g_ptr, row0, col0,
                N, v_end, H, HR, stride_x, stride_w, stride_xr, stride_wr, temp, has_bias, has_ref_bias,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                HAS_CUTOFFS: tl.constexpr):
    """d(KL)/d(logits) = g p ((zp - m_p) - (zq - m_q) - mean) / T for the (BLOCK_N, BLOCK_V) tile at
    (row0, col0), fp32, zero outside rows < N and cols < v_end (policy side only; module docstring),
    and, when HAS_CUTOFFS, zero off the kept sets (p = 0 there; the stats are over K)."""
    rows = row0 + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = col0 + tl.arange(0, BLOCK_V)
    col_mask = cols < v_end
    zp = _logits_tile(x_ptr, w_ptr, b_ptr, row0, col0, N - row0, v_end - col0, H, stride_x, stride_w, temp,
                      has_bias, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
    if HAS_CUTOFFS:
        cut_t, cut_i = _load_cut(cut_t_ptr, cut_i_ptr, rows, row_mask)
        zp = tl.where(_kept(zp, cut_t, cut_i, cols), zp, float("-inf"))
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
def _fused_linear_kl_divergence_bwd_kernel(x_ptr, w_ptr, b_ptr, xr_ptr, wr_ptr, br_ptr, cut_t_ptr, cut_i_ptr,
                                           stats_ptr, g_ptr,
                                           dx_ptr, dw_ptr, db_ptr, N, V, H, HR, v_begin, v_end,
                                           stride_x, stride_w, stride_xr, stride_wr, stride_dx, stride_dw,
                                           temp, has_bias, has_ref_bias, need_b, NEED_X: tl.constexpr,
                                           NEED_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                                           BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                           HAS_CUTOFFS: tl.constexpr):
    """Atomic backward, vocab slice [v_begin, v_end): one (token block, vocab tile) per program."""
    row0 = tl.program_id(0) * BLOCK_N
    col0 = v_begin + tl.program_id(1) * BLOCK_V
    d = _kl_dlogits(x_ptr, w_ptr, b_ptr, xr_ptr, wr_ptr, br_ptr, cut_t_ptr, cut_i_ptr, stats_ptr, g_ptr, row0,
                    col0, N, v_end, H, HR, stride_x, stride_w, stride_xr, stride_wr, temp, has_bias, has_ref_bias,
                    BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, HAS_CUTOFFS)
    _grad_products(d, x_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr, row0, col0, N - row0, v_end - col0, v_begin, H,
                   stride_x, stride_w, stride_dx, stride_dw, need_b, NEED_X, NEED_W, BLOCK_N, BLOCK_V, BLOCK_K,
                   DOT_PRECISION, False)


@triton.jit
def _fused_linear_kl_divergence_bwd_reduce_kernel(x_ptr, w_ptr, b_ptr, xr_ptr, wr_ptr, br_ptr, cut_t_ptr,
                                                  cut_i_ptr, stats_ptr, g_ptr, dx_ptr, dw_ptr, db_ptr, N, V, H, HR, v_begin, v_end,
                                                  stride_x, stride_w, stride_xr, stride_wr, stride_dx, stride_dw,
                                                  temp, has_bias, has_ref_bias, need_b, OWN_COLS: tl.constexpr,
                                                  NEED_X: tl.constexpr, NEED_W: tl.constexpr,
                                                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                                                  BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                                  HAS_CUTOFFS: tl.constexpr):
    """Backward without atomics (as _fused_linear_logprobs_bwd_reduce_kernel): OWN_COLS=False walks the
    vocab for BLOCK_N tokens and writes dx; OWN_COLS=True walks the tokens for BLOCK_V vocab rows and
    writes dw, db."""
    for i in range(0, _reduce_steps(N, v_begin, v_end, OWN_COLS, BLOCK_N, BLOCK_V)):
        row0, col0 = _reduce_tile(i, v_begin, OWN_COLS, BLOCK_N, BLOCK_V)
        d = _kl_dlogits(x_ptr, w_ptr, b_ptr, xr_ptr, wr_ptr, br_ptr, cut_t_ptr, cut_i_ptr, stats_ptr, g_ptr, row0,
                        col0, N, v_end, H, HR, stride_x, stride_w, stride_xr, stride_wr, temp, has_bias,
                        has_ref_bias, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, HAS_CUTOFFS)
        _grad_products(d, x_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr, row0, col0, N - row0, v_end - col0, v_begin, H,
                       stride_x, stride_w, stride_dx, stride_dw, need_b, NEED_X, NEED_W, BLOCK_N, BLOCK_V,
                       BLOCK_K, DOT_PRECISION, True)
        # the next step re-reads the dx/dw rows this step wrote, maybe from other threads of the block
        # (another layout, or an async copy): a block barrier orders those global accesses
        tl.debug_barrier()


# (HAS_CUTOFFS, HAS_TARGETS) of the forward specs: every combination the launcher can ask for.
FWD_VARIANTS = ((False, False), (True, False), (False, True), (True, True))


def _with_cutoffs(spec):
    """spec compiled with HAS_CUTOFFS=True (the backward's kept-set test), renamed."""
    return dataclasses.replace(spec, name=spec.name[:-1] + ",CUT=True]",
                               constexprs={**spec.constexprs, "HAS_CUTOFFS": True})


def static_configs():
    """Every config of every tuning set: the forward with and without cutoffs/targets; the backward's
    atomic passes, with HAS_CUTOFFS also for the full pass (X=W=True: the others keep a subset of its
    values live), and every reduce pass with and without it."""
    specs = []
    for dt, cfg in FUSED_CONFIGS.items():
        ptrs = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "xr_ptr": f"*{dt}", "wr_ptr": f"*{dt}",
                "br_ptr": f"*{dt}", "cut_t_ptr": "*fp32", "cut_i_ptr": "*i32"}
        table_cx = tile_constexprs(cfg, dt)[0]
        fwd_sig = {**ptrs, "tgt_ptr": "*i64", "part_ptr": "*fp64", "N": "i32", "V": "i32", "H": "i32", "HR": "i32",
                   "stride_x": "i32", "stride_w": "i32", "stride_xr": "i32", "stride_wr": "i32", "temp": "fp32",
                   "tiles_per_split": "i32", "has_bias": "i32", "has_ref_bias": "i32",
                   "HAS_CUTOFFS": "constexpr", "HAS_TARGETS": "constexpr", **{k: "constexpr" for k in table_cx}}
        for j, fwd_cfg in enumerate(FWD_TUNING_SETS[dt]):
            cx, tag = tile_constexprs(fwd_cfg, dt)
            # launches with cutoffs or targets take the table pick (no timing): only it is compiled with them
            for cut, tgt in FWD_VARIANTS if j == 0 else FWD_VARIANTS[:1]:
                variant = f",CUT={cut},TGT={tgt}" if (cut or tgt) else ""  # the plain forward keeps its name
                specs.append(KernelSpec(
                    f"fused_linear_kl_fwd[{tag}{variant}]", _fused_linear_kl_divergence_fwd_kernel,
                    fwd_sig, {**cx, "HAS_CUTOFFS": cut, "HAS_TARGETS": tgt}, fwd_cfg.num_warps, fwd_cfg.num_stages))
        bwd_sig = {**ptrs, "stats_ptr": "*fp32", "g_ptr": "*fp32",
                   "dx_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32", "N": "i32", "V": "i32", "H": "i32",
                   "HR": "i32", "v_begin": "i32", "v_end": "i32", "stride_x": "i32", "stride_w": "i32",
                   "stride_xr": "i32", "stride_wr": "i32", "stride_dx": "i32", "stride_dw": "i32",
                   "temp": "fp32", "has_bias": "i32", "has_ref_bias": "i32", "need_b": "i32",
                   "NEED_X": "constexpr", "NEED_W": "constexpr", "HAS_CUTOFFS": "constexpr",
                   **{k: "constexpr" for k in table_cx}}
        for j, bwd_cfg in enumerate(BWD_TUNING_SETS[dt]):
            cx, tag = tile_constexprs(bwd_cfg, dt)
            bwd = [KernelSpec(f"fused_linear_kl_bwd[{tag},X={need_x},W={need_w}]",
                              _fused_linear_kl_divergence_bwd_kernel, bwd_sig,
                              {**cx, "NEED_X": need_x, "NEED_W": need_w, "HAS_CUTOFFS": False},
                              bwd_cfg.num_warps, bwd_cfg.num_stages) for need_x, need_w in NEED_PAIRS]
            specs += bwd + ([_with_cutoffs(bwd[0])] if j == 0 else [])
        for j, pair in enumerate(REDUCE_TUNING_SETS[dt]):
            reduce = [dataclasses.replace(s, constexprs={**s.constexprs, "HAS_CUTOFFS": False})
                      for s in reduce_specs("fused_linear_kl_bwd_reduce", _fused_linear_kl_divergence_bwd_reduce_kernel,
                                            bwd_sig, dt, pair)]
            specs += reduce + ([_with_cutoffs(s) for s in reduce] if j == 0 else [])
    return specs
