"""Launch configs of the causal attention kernels (kernels/causal_attention.py), per stage, arch, dtype
and head dim. The launcher (rlhf_fast/ops/_attention_launch.py) and the CI static check
(causal_attention.static_configs) read the same tables, so what CI compiles is what runs.
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
