"""Launch configs of the row kernels (token_logprobs, kl_divergence): one program walks one row of V logits.

The launcher picks the first config whose block_v covers V, else the last one (looping over tiles).
Tuning sets per vocab regime, table pick first (rlhf_fast/ops/_autotune.py times them on the GPU). The
fastest public Triton row kernel, Liger-Kernel's cross entropy, walks a row in min(32768, next_pow2(V))
blocks with 32 warps: for LLM vocabularies (V > 16k) one 32768-wide block. Rows that fit the table's
first tile (V <= 1024) have nothing to tune.
"""
from collections import namedtuple

RowConfig = namedtuple("RowConfig", "block_v num_warps num_stages")
CONFIGS = (RowConfig(1024, 4, 2), RowConfig(4096, 8, 2))
TUNING_SETS = {"V<=1024": (CONFIGS[0],), "V>1024": (CONFIGS[1], RowConfig(32768, 32, 3))}


def tuning_set(vocab: int) -> tuple:
    """The configs the launcher may time for a row of `vocab` logits, the table pick first (the first
    config whose tile covers the row, else the widest, which loops over tiles)."""
    return TUNING_SETS["V<=1024" if vocab <= CONFIGS[0].block_v else "V>1024"]
