"""Planted bad kernel configs for tests/ci/test_static_check.py: static_check must reject each.

- planted_spill: one warp holds a 8192-element fp32 row live across a reduction, 256 values per
  thread, more than the 255 registers a thread may have, so ptxas spills to local memory.
- planted_shared: the clean matmul of static_good.py with BLOCK_K=128 and 8 pipeline stages:
  224 KiB of shared memory on sm_80 (limit 163 KiB), 256 KiB on sm_90 (limit 227 KiB), no spills.
- planted_compile_error: a kernel that does not type-check (tl.arange of a non-power-of-2 length).
- planted_no_wgmma: the clean matmul, required to use Hopper's wgmma, compiled for sm_80 (which has none).
"""
import triton
import triton.language as tl

from rlhf_fast.kernels._spec import KernelSpec

from static_good import MATMUL_SIGNATURE, _planted_matmul_kernel


@triton.jit
def _planted_spill_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    total = tl.sum(x * x, axis=0)
    tl.store(y_ptr + offs, x / total)


@triton.jit
def _planted_compile_error_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, offs)


def static_configs():
    return [
        KernelSpec("planted_spill", _planted_spill_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"},
                   {"BLOCK": 8192}, num_warps=1, num_stages=1),
        KernelSpec("planted_shared", _planted_matmul_kernel, MATMUL_SIGNATURE,
                   {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=8,
                   attrs={"K": "D"}),
        KernelSpec("planted_compile_error", _planted_compile_error_kernel, {"x_ptr": "*i32", "BLOCK": "constexpr"},
                   {"BLOCK": 100}, num_warps=4, num_stages=1),
        KernelSpec("planted_no_wgmma", _planted_matmul_kernel, MATMUL_SIGNATURE,
                   {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3,
                   ptx_contains={80: ("wgmma",)}),
    ]
