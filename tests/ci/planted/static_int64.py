"""Planted token-stride kernels for tests/ci/test_static_check.py: the static check's int64_args rule.

Both copy rows `offs` of a (T, D) matrix with token stride `stride_t`. planted_int32_offsets builds
`offs * stride_t` in 32 bits (wraps once it passes 2^31 elements); planted_int64_offsets widens first.
The check must fail the first and pass the second.
"""
import triton
import triton.language as tl

from rlhf_fast.kernels._spec import KernelSpec


@triton.jit
def _rows_int32_kernel(X, Y, stride_t, BLOCK: tl.constexpr, D: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ptrs = offs[:, None] * stride_t + tl.arange(0, D)[None, :]
    tl.store(Y + ptrs, tl.load(X + ptrs))


@triton.jit
def _rows_int64_kernel(X, Y, stride_t, BLOCK: tl.constexpr, D: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ptrs = offs[:, None].to(tl.int64) * stride_t + tl.arange(0, D)[None, :]
    tl.store(Y + ptrs, tl.load(X + ptrs))


SIGNATURE = {"X": "*fp16", "Y": "*fp16", "stride_t": "i32"}


def static_configs():
    consts = {"BLOCK": 64, "D": 64}
    return [KernelSpec(name, fn, SIGNATURE, consts, num_warps=4, num_stages=1, attrs={"stride_t": "D"},
                       int64_args=("stride_t",))
            for name, fn in (("planted_int32_offsets", _rows_int32_kernel),
                             ("planted_int64_offsets", _rows_int64_kernel))]
