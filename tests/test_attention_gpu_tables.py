"""Every GPU config table entry of the attention kernels, run by Triton's interpreter.

CPU tests otherwise run the tiles chosen for the interpreter (the sm_80 half-precision table); the tile
shapes decide which blocks are masked, where a sequence's tail falls and how dK/dV and dQ blocks meet
the diagonal, so each (arch, dtype, head dim) row the GPU would launch is run here on a ragged length,
padded and packed, with atomic and deterministic dQ, against float64 (FlashAttention's rule,
tests/attention_helpers.py).
"""
import pytest
import torch

from attention_helpers import check_against_float64, check_packed
from conftest import need_backend
from rlhf_fast.ops import _attention_launch as launch

LENGTHS = (21, 16)  # ragged: neither a multiple of 16


@pytest.mark.parametrize("d", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", [80, 90])
def test_table_entry_matches_float64(arch, dtype, d, device, monkeypatch):
    need_backend("triton", device)
    if device.type == "cuda":
        pytest.skip("on a GPU the suite already runs that GPU's own table")
    monkeypatch.setattr(launch, "arch_of", lambda _: arch)
    monkeypatch.setattr(launch, "table_dtype", lambda dt, _: launch.DTYPE_NAMES[dt])
    torch.manual_seed(d)
    q, k, v = (torch.randn(1, h, sum(LENGTHS), d, dtype=dtype, device=device) for h in (2, 1, 1))
    for det in (False, True):
        check_against_float64(q, k, v, deterministic=det)
    check_packed(LENGTHS, 2, 1, d, dtype, device)
