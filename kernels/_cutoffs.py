"""The kept-set test of the `cutoffs` contract (CUTOFFS.md), shared by the kernels that take cutoffs (a helper
module: no kernels, no static_configs).

A row's kept set arrives as (t fp32, i int32): token v with x_v = logit_v / T is kept iff x_v > t or
(x_v == t and v >= i). The kernels test the complement, one compare per logit on the x they already hold.
"""
import triton
import triton.language as tl


@triton.jit
def _dropped(x, cols, cut_t, cut_i):
    """True off the kept set: x < t, or x == t below index i. Written as the complement so that a NaN x is
    not dropped and its row turns NaN, as without cutoffs. cut_t/cut_i: scalars or (BLOCK_N, 1) columns."""
    return (x < cut_t) | ((x == cut_t) & (cols < cut_i))


@triton.jit
def _load_cut(cut_t_ptr, cut_i_ptr, rows, row_mask):
    """(t fp32, i int32) of the rows' cutoffs as the launchers pass them (i clamped to [0, V]); rows past N
    read (-inf, 0), which drops nothing."""
    return (tl.load(cut_t_ptr + rows, mask=row_mask, other=float("-inf")),
            tl.load(cut_i_ptr + rows, mask=row_mask, other=0))
