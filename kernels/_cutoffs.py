"""The kept-set test of the `cutoffs` contract (CUTOFFS.md), shared by the kernels that take cutoffs (a helper
module: no kernels, no static_configs).

A row's kept set arrives as (t fp32, i int32): token v with x_v = logit_v / T is kept iff x_v > t or
(x_v == t and v >= i). The kernels test the complement, one compare per logit on the x they already hold.
"""
import triton
import triton.language as tl  # noqa: F401  (Triton needs triton.language in a jit function's module)


@triton.jit
def _dropped(x, cols, cut_t, cut_i):
    """True off the kept set: x < t, or x == t below index i. Written as the complement so that a NaN x is
    not dropped and its row turns NaN, as without cutoffs. cut_t/cut_i: scalars or (BLOCK_N, 1) columns."""
    return (x < cut_t) | ((x == cut_t) & (cols < cut_i))
