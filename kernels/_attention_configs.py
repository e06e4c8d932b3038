"""Launch configs of the causal attention kernels (kernels/causal_attention.py), per stage, arch, dtype
and head dim: the table pick (`config`) and the tuning set (`tuning_set`) it heads. The launcher
(rlhf_fast/ops/_attention_launch.py, which times the set on the GPU through rlhf_fast/ops/_autotune.py)
and the CI static check (kernels/_attention_specs.py) read the same tables, so what CI compiles is
every config that can run.
"""
from __future__ import annotations

from typing import NamedTuple


class AttnConfig(NamedTuple):
    block_m: int      # query rows per block
    block_n: int      # key rows per block
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # ptxas register budget (.maxnreg); None lets ptxas choose


HEAD_DIMS = (16, 32, 64, 128, 256)
ARCHS = (80, 90)
DTYPES = ("fp16", "bf16", "fp32")

# (stage, arch, fp32 inputs) -> {head_dim: (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg])}. Every entry is the
# largest tile found free of register spills in the CI static check (Triton 3.9 and 3.6, strides 16-divisible).
# GPU timings to choose among spill-free tiles are still to be measured (no GPU was at hand).
_CONFIGS = {
    ("fwd", 90, False): {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 8, 3),
                         256: (64, 32, 8, 2)},
    ("fwd", 80, False): {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 8, 3), 128: (128, 32, 8, 2),
                         256: (64, 32, 8, 2)},
    ("bwd_pre", 90, False): {d: (128, 128, 4, 1) for d in HEAD_DIMS},
    ("bwd_pre", 80, False): {d: (128, 128, 4, 1) for d in HEAD_DIMS},
    ("bwd_dkdv", 90, False): {16: (32, 128, 8, 3), 32: (32, 128, 8, 3), 64: (32, 128, 8, 2), 128: (16, 64, 8, 2),
                              256: (16, 32, 8, 2)},
    ("bwd_dkdv", 80, False): {16: (32, 128, 8, 3), 32: (16, 64, 4, 1), 64: (16, 32, 4, 2), 128: (32, 64, 8, 2),
                              256: (16, 32, 8, 1)},
    ("bwd_dkdv_atomic", 90, False): {16: (32, 128, 8, 3), 32: (32, 64, 4, 3), 64: (32, 128, 8, 2),
                                     128: (16, 64, 8, 2), 256: (16, 32, 8, 2)},
    ("bwd_dkdv_atomic", 80, False): {16: (32, 128, 8, 3), 32: (16, 64, 4, 3), 64: (16, 64, 4, 2),
                                     128: (16, 32, 8, 2), 256: (16, 16, 8, 1)},
    ("bwd_dq", 90, False): {16: (128, 32, 4, 3), 32: (128, 32, 4, 3), 64: (128, 32, 4, 3), 128: (128, 32, 8, 2),
                            256: (64, 16, 8, 2)},
    ("bwd_dq", 80, False): {16: (128, 32, 4, 3), 32: (128, 32, 4, 3), 64: (128, 32, 8, 2), 128: (64, 32, 4, 2),
                            256: (32, 16, 8, 1)},
}
# fp32 inputs use IEEE dots (FMA, no tensor cores) that keep both operands in registers: 16- and 32-row
# tiles. ptxas (Triton 3.6's and 3.9's differ) picks register budgets erratically for these: a config
# clean on one arch or version can spill a few bytes on another, so every entry below was swept and
# chosen clean for both Triton versions and for the padded and packed variants. Where no tile was, an
# explicit register budget (maxnreg) stops ptxas from squeezing registers for occupancy and spilling.
_FP32_TILES = {
    "fwd": {16: (32, 16, 4, 2), 32: (32, 16, 4, 2), 64: (16, 16, 4, 2), 128: (16, 16, 8, 1), 256: (16, 16, 8, 1)},
    "bwd_pre": {d: (64, 64, 8, 1) for d in HEAD_DIMS},
    "bwd_dq": {16: (32, 16, 4, 2), 32: (32, 16, 4, 2), 64: (16, 16, 4, 2), 128: (16, 16, 8, 1), 256: (16, 16, 8, 1)},
}
# per-arch picks where the shared fp32 tile spilled on one arch only
_FP32_ARCH_PICKS = {("fwd", 90): {128: (32, 16, 8, 1)}, ("fwd", 80): {256: (32, 16, 8, 1)},
                    ("bwd_dq", 80): {64: (32, 16, 4, 2)}}
_CONFIGS.update({(stage, arch, True): {**table, **_FP32_ARCH_PICKS.get((stage, arch), {})}
                 for stage, table in _FP32_TILES.items() for arch in ARCHS})
_CONFIGS.update({
    ("bwd_dkdv", 80, True): {16: (16, 16, 4, 2), 32: (16, 16, 2, 2), 64: (16, 16, 4, 2), 128: (16, 32, 8, 1),
                             256: (16, 16, 4, 1)},
    ("bwd_dkdv", 90, True): {16: (16, 16, 8, 1), 32: (16, 16, 2, 2), 64: (16, 16, 4, 1), 128: (16, 16, 4, 2),
                             256: (16, 16, 8, 1)},
    # None: no tile of the atomic-dQ variant is spill-free (with int64 token offsets); the launcher takes
    # the deterministic path (dK/dV, then a dQ pass) there.
    ("bwd_dkdv_atomic", 80, True): {16: (16, 32, 4, 2), 32: (16, 16, 8, 1, 128), 64: (16, 16, 4, 2), 128: (16, 16, 8, 2),
                                    256: None},
    ("bwd_dkdv_atomic", 90, True): {16: (16, 16, 4, 2), 32: (16, 16, 8, 1), 64: (16, 16, 4, 2), 128: (16, 16, 8, 2),
                                    256: (16, 16, 8, 2)},
})


# Tuning sets. Each is the table pick above, then the configs of the fastest public Triton implementation
# for that arch and head-dim regime, fp16/bf16 only: (BLOCK_M, BLOCK_N, num_warps, num_stages). In our
# kernels BLOCK_M counts query rows and BLOCK_N key rows in every stage, so the tutorial's dK/dV tile
# (BLOCK_M1=32 query rows, BLOCK_N1=128 key rows) is (32, 128) here and its dQ tile (BLOCK_M2=128,
# BLOCK_N2=32) is (128, 32). Sources, read for their configs (no code taken):
#   sm_90: Triton tutorial 06 (fused attention), tuned on H100. Forward autotune space BLOCK_M 64/128 x
#          BLOCK_N 32/64/128, 2-4 stages with TMA, 8 warps only for 128x128 tiles on Hopper; 128x64/4
#          warps and 128x128/8 warps are its picks at D=64 and D=128, 64x64 the tile that fits D=256.
#          Backward: fixed 32x128 (dK/dV) and 128x32 (dQ) tiles, 4 warps, 5 stages, for every D; at
#          D=128 four warps spill ~20 KB in our dK/dV kernel (which also loops over the GQA group), so
#          there the set takes the tutorial's tile with 8 warps. Our kernels walk the diagonal in whole
#          tiles, not in the tutorial's half-tiles (BLK_SLICE_FACTOR=2).
#   sm_80: FlagAttention (flag_attn/flash.py, get_fwd_config/get_bwd_config), tuned on A100, causal:
#          forward D<=64 128x64/4 warps/4 stages, D=128 128x128/8/3 (long) and 128x32/4/2 (short
#          sequences); backward 64x64/4 warps, 3 stages at D<=64, 2 at D=128; no D=256 (and the
#          tutorial's D=256 tile overflows sm_80's shared memory), so D=256 keeps the table pick.
# Spills the static check finds in these are listed, with their bytes and source, in
# .ci/known_spills.json: a config that spills is timed like any other and simply loses if it is slow.
# fp32 runs FMA dots that no public Triton attention tunes for: its set is the table pick alone. So is the
# preprocess (delta = rowsum(O * dO), bandwidth-bound; the tutorial uses the same 128-row block).
_SMALL, _D128, _D256 = (16, 32, 64), (128,), (256,)
_PUBLIC_SETS = {
    ("fwd", 90): {_SMALL: ((128, 64, 4, 3), (128, 128, 8, 3)), _D128: ((128, 128, 8, 3), (128, 64, 4, 3)),
                  _D256: ((64, 64, 4, 2),)},
    ("fwd", 80): {_SMALL: ((128, 64, 4, 4),), _D128: ((128, 128, 8, 3), (128, 32, 4, 2))},
    ("bwd_dkdv", 90): {_SMALL: ((32, 128, 4, 5),), _D128: ((32, 128, 8, 3),), _D256: ((16, 64, 8, 1),)},
    ("bwd_dkdv", 80): {_SMALL: ((64, 64, 4, 3),), _D128: ((64, 64, 4, 2),)},
    ("bwd_dq", 90): {_SMALL: ((128, 32, 4, 5),), _D128: ((128, 32, 4, 5),)},
    ("bwd_dq", 80): {_SMALL: ((64, 64, 4, 3),), _D128: ((64, 64, 4, 2),)},
}
# the atomic-dQ variant takes the dK/dV tiles, except FlagAttention's at D=128 on sm_80: with the dQ
# product added it spilled 4.3 KB (Triton 3.9), past anything worth timing
_PUBLIC_SETS[("bwd_dkdv_atomic", 90)] = _PUBLIC_SETS[("bwd_dkdv", 90)]
_PUBLIC_SETS[("bwd_dkdv_atomic", 80)] = {_SMALL: _PUBLIC_SETS[("bwd_dkdv", 80)][_SMALL]}
# sm_90 fp16/bf16 configs allowed to run their dots on mma.sync instead of wgmma (the static check requires
# wgmma of every other Hopper attention config), with the reason. A warpgroup MMA covers 64 rows: the
# dK/dV kernel's dots at D=256 take BLOCK_N=64 key rows for it, and every such tile keeps dK and dV
# (64 x 256 fp32 each) in registers and spills (16x64/8 warps, added to the set above: 1060 B under
# Triton 3.9, 532 B under 3.6); the table pick, 32 key rows, is the spill-free fallback.
HOPPER_MMA_SYNC = {(stage, 256, (16, 32, 8, 2)): "dK/dV at D=256: no wgmma tile free of spills"
                   for stage in ("bwd_dkdv", "bwd_dkdv_atomic")}
STAGES = ("fwd", "bwd_pre", "bwd_dkdv", "bwd_dkdv_atomic", "bwd_dq")


def _public(stage: str, arch: int, head_dim: int) -> tuple:
    for dims, configs in _PUBLIC_SETS.get((stage, arch), {}).items():
        if head_dim in dims:
            return configs
    return ()


def tuning_set(stage: str, arch: int, head_dim: int, dtype: str) -> tuple[AttnConfig, ...]:
    """The configs the launcher may time for `stage`: the table pick first (the fallback, and the choice
    wherever no timing happens), then the public configs of the module comment, without repeats."""
    out = [config(stage, arch, head_dim, dtype)]
    for entry in () if dtype == "fp32" else _public(stage, arch, head_dim):
        cfg = AttnConfig(*entry)
        if cfg not in out:
            out.append(cfg)
    return tuple(out)


def regime(head_dim: int, dtype: str) -> str:
    """Name of the tuning set's (dtype class, head-dim regime), for reports."""
    dims = next((f"D in {list(d)}" for d in (_SMALL, _D128, _D256) if head_dim in d), f"D={head_dim}")
    return f"{'fp32' if dtype == 'fp32' else 'fp16/bf16'}, {dims}"


def uses_tma(arch: int, dtype: str) -> bool:
    """Whether the forward on this config table reads K and V through TMA descriptors: Hopper (and
    datacenter Blackwell, which share the sm_90 table) for fp16/bf16. fp32 runs FMA dots on 16-row tiles,
    bound by arithmetic, not loads."""
    return arch == 90 and dtype != "fp32"


def tma_block(cfg: AttnConfig, head_dim: int) -> list[int]:
    """Block shape of the K/V descriptors under `cfg`, (1, 1, BLOCK_N, D) over (batch, head, token, dim)."""
    return [1, 1, cfg.block_n, head_dim]


def has_config(stage: str, arch: int, head_dim: int, dtype: str) -> bool:
    """False where the table marks a stage as not launched (None): only bwd_dkdv_atomic, whose callers
    then take the deterministic dQ pass."""
    return _CONFIGS[(stage, arch, dtype == "fp32")][head_dim] is not None


def config(stage: str, arch: int, head_dim: int, dtype: str) -> AttnConfig:
    """The config the launcher uses for `stage` ("fwd", "bwd_pre", "bwd_dkdv", "bwd_dkdv_atomic", "bwd_dq")."""
    entry = _CONFIGS[(stage, arch, dtype == "fp32")][head_dim]
    if entry is None:
        raise KeyError(f"no {stage} config for sm_{arch}, {dtype}, head dim {head_dim} (see has_config)")
    return AttnConfig(*entry)
