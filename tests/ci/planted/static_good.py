"""A clean kernel config for tests/ci/test_static_check.py: static_check must pass it.

A tiled matmul (fp16 in, fp32 out) whose pipelined tiles take 24 KiB of shared memory on sm_80 and
32 KiB on sm_90, with no spills.
"""
import triton
import triton.language as tl

from rlhf_fast.kernels._spec import KernelSpec


@triton.jit
def _planted_matmul_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    # a: (BLOCK_M, K) row-major, b: (K, BLOCK_N) row-major, c: (BLOCK_M, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BLOCK_N + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * BLOCK_N + rn[None, :], acc)


MATMUL_SIGNATURE = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32",
                    "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}


def static_configs():
    return [KernelSpec("planted_matmul[64x64x64]", _planted_matmul_kernel, MATMUL_SIGNATURE,
                       {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3)]
