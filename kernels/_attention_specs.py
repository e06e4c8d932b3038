"""What the CI static check compiles for the causal attention kernels: every config of every tuning set
(kernels/_attention_configs.py), per arch, dtype, head dim and layout (padded in
kernels/causal_attention.py, packed in kernels/causal_attention_varlen.py).

Rules beyond the check's own (spills, shared memory, int64 strides):
- Hopper (sm_90) fp16/bf16 forward and backward configs must lower their dots to wgmma (`HOPPER_DOT`):
  a tile that falls back to mma.sync runs at a fraction of the tensor cores' rate, and such a config
  has no place in a tuning set. The exceptions, each with its reason, are kernels/_attention_configs.
  HOPPER_MMA_SYNC. The TMA forward must also show its bulk tensor copies.
"""
from __future__ import annotations

import dataclasses

from ._attention_configs import (ARCHS, DTYPES, HEAD_DIMS, HOPPER_MMA_SYNC, has_config, tma_block, tuning_set,
                                 uses_tma)
from ._spec import KernelSpec

HOPPER_DOT = "wgmma"


def hopper_ptx(arch: int, dtype: str, *extra: str) -> dict:
    """KernelSpec.ptx_contains for an attention config with dots: wgmma on sm_90 for fp16/bf16."""
    if arch != 90 or dtype == "fp32":
        return {}
    return {90: (*extra, HOPPER_DOT)}


def signature(dtype: str, names: str, scalars: str) -> dict:
    sig = {}
    for name in names.split():
        sig[name] = "*i32" if name == "CU_SEQLENS" else "*fp32" if name in ("LSE", "DELTA") else f"*{dtype}"
    for name in scalars.split():
        sig[name] = "fp32" if "scale" in name else "i32"
    return sig


def aligned_attrs(signature: dict) -> dict:
    """KernelSpec attrs marking every stride 16-divisible ("D"), as Triton's JIT specializes them at run
    time: with head dims >= 16, all batch/head/token strides of torch tensors are multiples of 16
    (pointers are compiled 16-byte aligned by the static check already)."""
    return {n: "D" for n in signature if n.startswith("stride")}


def stride_args(signature: dict) -> tuple:
    """Every stride argument: the static check asserts each is widened to int64 before use."""
    return tuple(n for n in signature if n.startswith("stride"))


def _strides(*prefixes: str) -> str:
    return " ".join(f"stride_{p}{axis}" for p in prefixes for axis in "bht")


def _tile(c) -> str:
    """The config in a spec name (names key .ci/known_spills.json, so each config of a set has its own)."""
    return f"BM={c.block_m},BN={c.block_n},w{c.num_warps},s{c.num_stages}"


def all_specs(kern, varlen: bool) -> list[KernelSpec]:
    """Every (kernel, config) of module `kern` (kernels.causal_attention) the launchers can pick for the
    padded (varlen=False) or packed layout."""
    specs = []
    for arch in ARCHS:
        for dtype in DTYPES:
            for d in HEAD_DIMS:
                specs += _specs_for(kern, arch, dtype, d, varlen)
    return [dataclasses.replace(sp, attrs=aligned_attrs(sp.signature), int64_args=stride_args(sp.signature))
            for sp in specs]


def _specs_for(kern, arch: int, dtype: str, d: int, varlen: bool) -> list[KernelSpec]:
    prec = "ieee" if dtype == "fp32" else "tf32"
    tag = f"D={d},{dtype},sm{arch}{',varlen' if varlen else ''}"
    lse = "stride_lb stride_lh"
    out = []
    for c in tuning_set("fwd", arch, d, dtype):
        # Where the forward uses TMA, the pointer variant still runs for tensors TMA cannot address
        # (unaligned) or with RLHF_FAST_ATTN_TMA=0: both are checked.
        for tma in (False, True) if uses_tma(arch, dtype) else (False,):
            sig = signature(dtype, "Q K V O LSE CU_SEQLENS",
                            f"{_strides('q', 'k', 'v', 'o')} {lse} max_seqlen n_q_heads group qk_scale")
            if tma:
                sig["K"] = sig["V"] = f"tensordesc<{dtype}{tma_block(c, d)}>"
            out.append(KernelSpec(
                f"attn_fwd[{tag},{_tile(c)}{',tma' if tma else ''}]", kern._attn_fwd_kernel, sig,
                dict(HEAD_DIM=d, BLOCK_M=c.block_m, BLOCK_N=c.block_n, IS_VARLEN=varlen, DOT_PRECISION=prec,
                     USE_TMA=tma),
                c.num_warps, c.num_stages, (arch,), maxnreg=c.maxnreg,
                ptx_contains=hopper_ptx(arch, dtype, *(("cp.async.bulk.tensor",) if tma else ()))))
    for c in tuning_set("bwd_pre", arch, d, dtype):
        out.append(KernelSpec(
            f"attn_bwd_pre[{tag},BM={c.block_m}]", kern._attn_bwd_preprocess_kernel,
            signature(dtype, "O DO DELTA CU_SEQLENS", "stride_ob stride_oh stride_ot stride_db stride_dh stride_dt "
                      f"{lse} max_seqlen n_q_heads"),
            dict(HEAD_DIM=d, BLOCK_M=c.block_m, IS_VARLEN=varlen), c.num_warps, c.num_stages, (arch,),
            maxnreg=c.maxnreg))
    for atomic in (False, True) if has_config("bwd_dkdv_atomic", arch, d, dtype) else (False,):
        sig = signature(dtype, "Q K V DO LSE DELTA DK DV DQ CU_SEQLENS",
                        f"{_strides('q', 'k', 'v', 'do', 'dk', 'dv', 'dq')} {lse} max_seqlen n_kv_heads group "
                        "scale qk_scale")
        sig["DQ"] = "*fp32" if atomic else f"*{dtype}"
        stage = "bwd_dkdv_atomic" if atomic else "bwd_dkdv"
        for c in tuning_set(stage, arch, d, dtype):
            out.append(KernelSpec(
                f"attn_bwd_dkdv[{tag},{_tile(c)}{',atomic_dq' if atomic else ''}]",
                kern._attn_bwd_dkdv_kernel, sig,
                dict(HEAD_DIM=d, BLOCK_M=c.block_m, BLOCK_N=c.block_n, IS_VARLEN=varlen, ATOMIC_DQ=atomic,
                     DOT_PRECISION=prec), c.num_warps, c.num_stages, (arch,), maxnreg=c.maxnreg,
                ptx_contains={} if (stage, d, tuple(c)[:4]) in HOPPER_MMA_SYNC else hopper_ptx(arch, dtype)))
    for c in tuning_set("bwd_dq", arch, d, dtype):
        out.append(KernelSpec(
            f"attn_bwd_dq[{tag},{_tile(c)}]", kern._attn_bwd_dq_kernel,
            signature(dtype, "Q K V DO LSE DELTA DQ CU_SEQLENS",
                      f"{_strides('q', 'k', 'v', 'do', 'dq')} {lse} max_seqlen n_q_heads group scale qk_scale"),
            dict(HEAD_DIM=d, BLOCK_M=c.block_m, BLOCK_N=c.block_n, IS_VARLEN=varlen, DOT_PRECISION=prec),
            c.num_warps, c.num_stages, (arch,), maxnreg=c.maxnreg, ptx_contains=hopper_ptx(arch, dtype)))
    return out
