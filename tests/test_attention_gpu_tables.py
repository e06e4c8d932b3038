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
from rlhf_fast.ops import _autotune

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


@pytest.mark.parametrize("d,pick", [(64, 1), (128, 1), (128, 2)])
@pytest.mark.parametrize("arch", [80, 90])
def test_tuning_set_entry_matches_float64(arch, d, pick, device, monkeypatch):
    """The public configs of every stage's tuning set (kernels/_attention_configs.py: pick 1 is each set's
    second config, pick 2 its third, or its last where it has fewer), as autotuning may launch them."""
    need_backend("triton", device)
    if device.type == "cuda":
        pytest.skip("on a GPU the launchers time and run the sets themselves")
    monkeypatch.setattr(launch, "arch_of", lambda _: arch)
    chosen = []

    def choose(kernel, regime, candidates, run, dev, **kw):
        chosen.append((kernel, candidates[min(pick, len(candidates) - 1)]))
        return chosen[-1][1]

    monkeypatch.setattr(_autotune, "choose", choose)
    torch.manual_seed(d + pick)
    q, k, v = (torch.randn(1, h, sum(LENGTHS), d, dtype=torch.bfloat16, device=device) for h in (2, 1, 1))
    for det in (False, True):
        check_against_float64(q, k, v, deterministic=det)
    check_packed(LENGTHS, 2, 1, d, torch.bfloat16, device)
    assert {kernel for kernel, _ in chosen} >= {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"}
