"""Every GPU config table entry of the attention kernels, run by Triton's interpreter.

CPU tests otherwise run the tiles chosen for the interpreter (the sm_80 half-precision table); the tile
shapes decide which blocks are masked, where a sequence's tail falls and how dK/dV and dQ blocks meet
the diagonal, so each (arch, dtype, head dim) row the GPU would launch is run here on a ragged length,
padded and packed, with atomic and deterministic dQ, against float64 (FlashAttention's rule,
tests/attention_helpers.py).
"""
import pytest
import torch

from attention_helpers import assert_attention_close, attention_math
from conftest import need_backend
from rlhf_fast import causal_attention, causal_attention_varlen
from rlhf_fast.ops import _attention_launch as launch
from rlhf_fast.reference.causal_attention import causal_attention as reference


def _grads(fn, q, k, v, do, **kw):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), do.to(out.dtype)))


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
    lengths = (21, 16)  # ragged: neither a multiple of 16
    q, k, v = (torch.randn(1, h, sum(lengths), d, dtype=dtype, device=device) for h in (2, 1, 1))
    do = torch.randn_like(q)
    ref64 = _grads(reference, q.double(), k.double(), v.double(), do.double())
    same = _grads(attention_math, q, k, v, do)
    for det in (False, True):
        ours = _grads(causal_attention, q, k, v, do, backend="triton", deterministic=det)
        for name, a, r, s in zip(("out", "dq", "dk", "dv"), ours, ref64, same):
            assert_attention_close(a, r, s, f"padded {name} (deterministic={det})")
    # packed: two sequences, each checked on its own
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32, device=device)
    packed = [x[0].transpose(0, 1) for x in (q, k, v, do)]
    ours = _grads(lambda *t: causal_attention_varlen(*t, cu, max(lengths), backend="triton"), *packed)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seq = [x[:, :, s:e] for x in (q, k, v, do)]
        ref64 = _grads(reference, *(x.double() for x in seq))
        same = _grads(attention_math, *seq)
        for name, a, r, m in zip(("out", "dq", "dk", "dv"), ours, ref64, same):
            assert_attention_close(a[s:e], r[0].transpose(0, 1), m[0].transpose(0, 1), f"packed [{s}:{e}] {name}")
