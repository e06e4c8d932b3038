"""Triton kernels for fused_linear_logprobs: lm_head matmul tiles (tl.dot) fused with the softmax statistics.

A program owns BLOCK_N tokens and a run of BLOCK_V-wide vocab tiles. For each tile it computes the
(BLOCK_N, BLOCK_V) logits in registers (K loop over the hidden size), folds them into per-row online
(max, sum-exp, sum-exp*(z - max), target logit), and drops them: the logits never reach global memory.
Vocab splits (grid axis 1) write partial statistics that the launcher combines, so small N still fills
the GPU. The backward recomputes each logit tile, forms d(logits) on chip and adds its products into
fp32 d(hidden) and d(weight) buffers, in one of two ways:

- atomic (`_bwd_kernel`): one program per (token block, vocab tile), fp32 atomics into dx (V/BLOCK_V
  adds per element) and dw (N/BLOCK_N adds per element). Most parallel; the sum order is not fixed.
- reduce (`_bwd_reduce_kernel`, no atomics, bitwise deterministic): pass OWN_COLS=False gives each
  program BLOCK_N tokens and walks the vocab, adding d @ w into rows of dx that only it writes; pass
  OWN_COLS=True gives each program BLOCK_V vocab rows and walks the tokens, adding d.T @ x into rows
  of dw (and d.sum(0) into db) that only it writes. Each pass recomputes the logit tiles, so it costs
  one more (N, V, H) matmul than the atomic kernel, and it makes as many fp32 read-modify-writes of
  dx/dw (plain loads and stores, in a fixed order) as the atomic kernel makes atomics.

HAS_CUTOFFS (constexpr; off, the kernels are the plain ones): each token's kept set (t fp32, i int32,
CUTOFFS.md) is tested on the logit tile in registers, one compare per logit: the forward sets dropped
logits to -inf before the online statistics (so a split may see no kept logit: m = -inf, s = 0, which
the launcher's combine handles), and so does the backward, where p = 0 then gives d(logits) = 0.
"""
from dataclasses import replace

import triton
import triton.language as tl

from ._cutoffs import _dropped, _load_cut
from ._fused_linear import (CCE_BWD, CCE_FWD, NEED_PAIRS, TileConfig, _grad_products, _logits_tile,
                            _reduce_steps, _reduce_tile, reduce_specs, tile_constexprs)
from ._online_softmax import _online_lse_step, _rebased_sum
from ._spec import KernelSpec

# One config per input dtype; the launcher uses exactly this table. fp32 dots run on FMA units with the
# tile in registers, so fp32 takes a smaller tile than the tensor-core dtypes to stay free of spills.
CONFIGS = {
    "fp32": TileConfig(32, 64, 32, 4, 2),
    "bf16": TileConfig(64, 128, 64, 8, 3),
    "fp16": TileConfig(64, 128, 64, 8, 3),
}
# The reduce backward's (dx pass, dw pass) tiles per input dtype: its outer loop keeps more values
# live than the atomic kernel, and CONFIGS' tiles spill there (up to ~1 KB on sm_80/sm_90 under
# Triton 3.9); these are the largest of those tried with no spills on either arch. fp32: the dx pass at
# 32 rows spilled 8 B on sm_80 under Triton 3.6, and the dw pass with 4 warps 4 B on sm_90 (3.6, with
# the logits divided by T in _logits_tile); 16 rows, and 8 warps and one stage for dw, do not.
REDUCE_CONFIGS = {
    "fp32": (TileConfig(16, 32, 32, 4, 2), TileConfig(16, 32, 32, 8, 1)),
    "bf16": (TileConfig(64, 128, 32, 8, 3), TileConfig(64, 64, 32, 8, 3)),
    "fp16": (TileConfig(64, 128, 32, 8, 3), TileConfig(64, 64, 32, 8, 3)),
}
# Tuning sets per input dtype, the table pick first (rlhf_fast/ops/_autotune.py times them on the GPU):
# fp16/bf16 add cut-cross-entropy's tiles (kernels/_fused_linear.CCE_FWD, CCE_BWD; the reduce passes take
# the backward's). fp32 (FMA dots) keeps the table pick.
FWD_TUNING_SETS = {dt: (cfg,) if dt == "fp32" else (cfg, CCE_FWD) for dt, cfg in CONFIGS.items()}
BWD_TUNING_SETS = {dt: (cfg,) if dt == "fp32" else (cfg, CCE_BWD) for dt, cfg in CONFIGS.items()}
REDUCE_TUNING_SETS = {dt: (pair,) if dt == "fp32" else (pair, (CCE_BWD, CCE_BWD)) for dt, pair in REDUCE_CONFIGS.items()}


@triton.jit
def _fused_linear_logprobs_fwd_kernel(x_ptr, w_ptr, b_ptr, t_ptr, cut_t_ptr, cut_i_ptr, part_ptr, N, V, H,
                                      stride_x, stride_w, temp, ignore_index, tiles_per_split, has_bias,
                                      want_entropy, HAS_CUTOFFS: tl.constexpr, BLOCK_N: tl.constexpr,
                                      BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """part (4, splits, N) fp32 <- per split: m = max z, sum exp(z - m), sum exp(z - m) (z - m), z[target]."""
    split = tl.program_id(1)
    row0 = tl.program_id(0) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    t = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    sy = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_CUTOFFS:
        cut_t, cut_i = _load_cut(cut_t_ptr, cut_i_ptr, rows, row_mask)
        cut_t, cut_i = cut_t[:, None], cut_i[:, None]
    v_begin = split * tiles_per_split * BLOCK_V
    # A fixed trip count (not a bound derived from program_id): the launcher makes every split start
    # inside the vocab, so the first tile has a finite max and later all-masked tiles change nothing.
    for i in range(0, tiles_per_split):
        col0 = v_begin + i * BLOCK_V
        cols = col0 + tl.arange(0, BLOCK_V)
        z = _logits_tile(x_ptr, w_ptr, b_ptr, row0, col0, N - row0, V - col0, H, stride_x, stride_w, temp,
                         has_bias, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        z = tl.where((cols < V)[None, :], z, float("-inf"))  # no softmax mass past the vocab
        if HAS_CUTOFFS:
            z = tl.where(_dropped(z, cols[None, :], cut_t, cut_i), float("-inf"), z)
        m_new, s_new, alpha, y, e = _online_lse_step(z, m, s, 1)
        if want_entropy:
            # sy = sum exp(z - m) (z - m) (entropy = log s - sy / s)
            sy = _rebased_sum(sy, s, alpha, m - m_new, e * y, 1)
        zt += tl.sum(tl.where(cols[None, :] == t[:, None], z, 0.0), 1)
        m, s = m_new, s_new
    n_splits = tl.num_programs(1)
    out = part_ptr + split * N + rows
    tl.store(out, m, mask=row_mask)
    tl.store(out + n_splits * N, s, mask=row_mask)
    tl.store(out + 2 * n_splits * N, sy, mask=row_mask)
    tl.store(out + 3 * n_splits * N, zt, mask=row_mask)


@triton.jit
def _logprobs_dlogits(x_ptr, w_ptr, b_ptr, t_ptr, cut_t_ptr, cut_i_ptr, stats_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
                      row0, col0, N, v_end, H, stride_x, stride_w, temp, ignore_index, has_bias, have_entropy,
                      HAS_CUTOFFS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                      BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """d(loss)/d(logits) = (g_logp (onehot - p) - g_H p (log p + H)) / T for the (BLOCK_N, BLOCK_V) tile at
    (row0, col0), fp32, zero outside rows < N and cols < v_end (and, with cutoffs, off the kept set)."""
    rows = row0 + tl.arange(0, BLOCK_N)
    cols = col0 + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < v_end
    z = _logits_tile(x_ptr, w_ptr, b_ptr, row0, col0, N - row0, v_end - col0, H, stride_x, stride_w, temp,
                     has_bias, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
    if HAS_CUTOFFS:
        # off the kept set p = 0, so d = 0 below: the launcher zeroes g_logp of a target off its set and
        # gives a row that keeps nothing finite stats. Masking z here, not d at the end, keeps the mask's
        # registers out of the tile's busiest stretch (a late mask spilled in the reduce dx pass on sm_80).
        cut_t, cut_i = _load_cut(cut_t_ptr, cut_i_ptr, rows, row_mask)
        z = tl.where(_dropped(z, cols[None, :], cut_t[:, None], cut_i[:, None]), float("-inf"), z)
    t = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (t != ignore_index)
    g_logp = tl.where(valid, tl.load(g_logp_ptr + rows, mask=row_mask, other=0.0), 0.0)
    m = tl.load(stats_ptr + rows, mask=row_mask, other=0.0)
    log_s = tl.load(stats_ptr + N + rows, mask=row_mask, other=0.0)
    logp = (z - m[:, None]) - log_s[:, None]
    p = tl.exp(logp)
    coef = g_logp[:, None] + tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if have_entropy:
        g_ent = tl.where(valid, tl.load(g_ent_ptr + rows, mask=row_mask, other=0.0), 0.0)
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        coef += g_ent[:, None] * (logp + ent[:, None])
    # -inf logit (p = 0): zero gradient, not 0 * inf; NaN rows (NaN stats) stay NaN as in the reference
    d = tl.where(logp == float("-inf"), 0.0, -p * coef)
    # the gradient's 1/T only scales the result (a relative error of one rounding), so a multiply: a
    # per-element division of the tile spilled on sm_90 (bf16/fp16 atomic backward)
    d = tl.where(cols[None, :] == t[:, None], d + g_logp[:, None], d) * (1.0 / temp)
    return tl.where(row_mask[:, None] & col_mask[None, :], d, 0.0)


@triton.jit
def _fused_linear_logprobs_bwd_kernel(x_ptr, w_ptr, b_ptr, t_ptr, cut_t_ptr, cut_i_ptr, stats_ptr, ent_ptr,
                                      g_logp_ptr, g_ent_ptr, dx_ptr, dw_ptr, db_ptr, N, V, H, v_begin, v_end,
                                      stride_x, stride_w, stride_dx, stride_dw, temp, ignore_index, has_bias,
                                      have_entropy, need_b, NEED_X: tl.constexpr, NEED_W: tl.constexpr,
                                      HAS_CUTOFFS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                                      BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Atomic backward, vocab slice [v_begin, v_end): one (token block, vocab tile) per program."""
    row0 = tl.program_id(0) * BLOCK_N
    col0 = v_begin + tl.program_id(1) * BLOCK_V
    d = _logprobs_dlogits(x_ptr, w_ptr, b_ptr, t_ptr, cut_t_ptr, cut_i_ptr, stats_ptr, ent_ptr, g_logp_ptr,
                          g_ent_ptr, row0, col0, N, v_end, H, stride_x, stride_w, temp, ignore_index, has_bias,
                          have_entropy, HAS_CUTOFFS, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
    _grad_products(d, x_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr, row0, col0, N - row0, v_end - col0, v_begin, H,
                   stride_x, stride_w, stride_dx, stride_dw, need_b, NEED_X, NEED_W, BLOCK_N, BLOCK_V, BLOCK_K,
                   DOT_PRECISION, False)


@triton.jit
def _fused_linear_logprobs_bwd_reduce_kernel(x_ptr, w_ptr, b_ptr, t_ptr, cut_t_ptr, cut_i_ptr, stats_ptr, ent_ptr,
                                             g_logp_ptr, g_ent_ptr, dx_ptr, dw_ptr, db_ptr, N, V, H, v_begin,
                                             v_end, stride_x, stride_w, stride_dx, stride_dw, temp, ignore_index,
                                             has_bias, have_entropy, need_b, OWN_COLS: tl.constexpr,
                                             NEED_X: tl.constexpr, NEED_W: tl.constexpr,
                                             HAS_CUTOFFS: tl.constexpr, BLOCK_N: tl.constexpr,
                                             BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                                             DOT_PRECISION: tl.constexpr):
    """Backward without atomics, vocab slice [v_begin, v_end) (see the module docstring): OWN_COLS=False,
    grid (cdiv(N, BLOCK_N),), writes dx; OWN_COLS=True, grid (cdiv(v_end - v_begin, BLOCK_V),), writes
    dw and db."""
    for i in range(0, _reduce_steps(N, v_begin, v_end, OWN_COLS, BLOCK_N, BLOCK_V)):
        row0, col0 = _reduce_tile(i, v_begin, OWN_COLS, BLOCK_N, BLOCK_V)
        d = _logprobs_dlogits(x_ptr, w_ptr, b_ptr, t_ptr, cut_t_ptr, cut_i_ptr, stats_ptr, ent_ptr, g_logp_ptr,
                              g_ent_ptr, row0, col0, N, v_end, H, stride_x, stride_w, temp, ignore_index, has_bias,
                              have_entropy, HAS_CUTOFFS, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        _grad_products(d, x_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr, row0, col0, N - row0, v_end - col0, v_begin, H,
                       stride_x, stride_w, stride_dx, stride_dw, need_b, NEED_X, NEED_W, BLOCK_N, BLOCK_V,
                       BLOCK_K, DOT_PRECISION, True)
        # the next step re-reads the dx/dw rows this step wrote, maybe from other threads of the block
        # (another layout, or an async copy): a block barrier orders those global accesses
        tl.debug_barrier()


def static_configs():
    """Every config of every tuning set (forward, atomic backward, reduce backward passes)."""
    specs = []
    for dt in CONFIGS:
        for cut in (False, True):
            specs += _specs(dt, cut)
    return specs


def _specs(dt, cut):
    """The kernels of one dtype, every config of its tuning sets, with HAS_CUTOFFS = cut (marked CUT=True or
    _cut); without cutoffs the launcher passes an fp32 buffer for both cut pointers."""
    cut_sig = {"cut_t_ptr": "*fp32", "cut_i_ptr": "*i32" if cut else "*fp32"}
    mark = ",CUT=True" if cut else ""
    specs = []
    # HAS_CUTOFFS launches take the table pick (no timing): only that config is compiled with it
    for cfg in FWD_TUNING_SETS[dt][:1] if cut else FWD_TUNING_SETS[dt]:
        cx, tag = tile_constexprs(cfg, dt)
        cx["HAS_CUTOFFS"] = cut
        specs.append(KernelSpec(
            f"fused_linear_logprobs_fwd[{tag}{mark}]", _fused_linear_logprobs_fwd_kernel,
            {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "t_ptr": "*i64", **cut_sig, "part_ptr": "*fp32",
             "N": "i32", "V": "i32", "H": "i32", "stride_x": "i32", "stride_w": "i32", "temp": "fp32",
             "ignore_index": "i32", "tiles_per_split": "i32", "has_bias": "i32", "want_entropy": "i32",
             **{k: "constexpr" for k in cx}}, cx, cfg.num_warps, cfg.num_stages))
    bwd_sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "t_ptr": "*i64", **cut_sig,
               "stats_ptr": "*fp32", "ent_ptr": "*fp32", "g_logp_ptr": "*fp32", "g_ent_ptr": "*fp32",
               "dx_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32", "N": "i32", "V": "i32", "H": "i32",
               "v_begin": "i32", "v_end": "i32", "stride_x": "i32", "stride_w": "i32", "stride_dx": "i32",
               "stride_dw": "i32", "temp": "fp32", "ignore_index": "i32", "has_bias": "i32", "have_entropy": "i32",
               "need_b": "i32", "NEED_X": "constexpr", "NEED_W": "constexpr", "HAS_CUTOFFS": "constexpr",
               **{k: "constexpr" for k in tile_constexprs(CONFIGS[dt], dt)[0]}}
    for cfg in BWD_TUNING_SETS[dt][:1] if cut else BWD_TUNING_SETS[dt]:
        cx, tag = tile_constexprs(cfg, dt)
        cx["HAS_CUTOFFS"] = cut
        for need_x, need_w in NEED_PAIRS:
            specs.append(KernelSpec(
                f"fused_linear_logprobs_bwd[{tag}{mark},X={need_x},W={need_w}]", _fused_linear_logprobs_bwd_kernel,
                bwd_sig, {**cx, "NEED_X": need_x, "NEED_W": need_w}, cfg.num_warps, cfg.num_stages))
    for pair in REDUCE_TUNING_SETS[dt][:1] if cut else REDUCE_TUNING_SETS[dt]:
        reduce = reduce_specs("fused_linear_logprobs_bwd_reduce" + ("_cut" if cut else ""),
                              _fused_linear_logprobs_bwd_reduce_kernel, bwd_sig, dt, pair)
        specs += [replace(spec, constexprs={**spec.constexprs, "HAS_CUTOFFS": cut}) for spec in reduce]
    return specs
