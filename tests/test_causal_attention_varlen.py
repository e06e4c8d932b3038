"""causal_attention_varlen: packed sequences checked one by one against float64 math; bad cu_seqlens.

Tolerance as in test_causal_attention.py (tests/attention_helpers.py), per sequence and per tensor
(out, dq, dk, dv).
"""
import pytest
import torch

from attention_helpers import assert_bad_input_raises, check_packed, pack
from conftest import need_backend
from rlhf_fast import causal_attention_varlen
from rlhf_fast.reference.causal_attention import causal_attention as reference

LENGTHS = (1, 5, 64, 100)


@pytest.mark.parametrize("hq,hkv", [(4, 1), (2, 2)], ids=["gqa4", "mha"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_matches_per_sequence(hq, hkv, dtype, device):
    need_backend("triton", device)
    check_packed(LENGTHS, hq, hkv, 64, dtype, device)


def test_empty_sequences_and_trailing_rows(device):
    """Empty sequences are skipped, rows after cu_seqlens[-1] get zeros (deterministic dQ path)."""
    need_backend("triton", device)
    check_packed((0, 17, 0, 3), 2, 1, 16, torch.float32, device, extra_rows=4, deterministic=True)


def test_head_dim_128_strided(device):
    """(total, H, D) views with a padded head stride are read in place."""
    need_backend("triton", device)
    lengths = (33, 7)
    q, k, v, cu = pack(lengths, 2, 1, 128, torch.float32, device)
    wide = torch.randn(q.shape[0], 3, 128, device=device)
    q = wide[:, :2]
    assert not q.is_contiguous()
    out = causal_attention_varlen(q, k, v, cu, 33, backend="triton")
    for s, e in ((0, 33), (33, 40)):
        ref = reference(*(x[s:e].double().transpose(0, 1).unsqueeze(0) for x in (q, k, v)))
        assert (out[s:e].double() - ref.squeeze(0).transpose(0, 1)).abs().max().item() < 2e-5


def test_reference_backend_matches_triton(device):
    need_backend("triton", device)
    q, k, v, cu = pack((3, 9), 2, 2, 32, torch.float32, device)
    a = causal_attention_varlen(q, k, v, cu, 9, backend="reference")
    b = causal_attention_varlen(q, k, v, cu, 9, backend="triton")
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_torch_compile_fullgraph(device):
    need_backend("triton", device)
    q, k, v, cu = pack((3, 9), 2, 1, 16, torch.float32, device)
    fn = torch.compile(lambda q, k, v: causal_attention_varlen(q, k, v, cu, 9, backend="triton"),
                       fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(q, k, v), causal_attention_varlen(q, k, v, cu, 9, backend="triton"))


def _good_args():
    q, k, v, cu = pack((3, 4), 4, 2, 16, torch.float32, "cpu")
    return dict(q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=4)


BAD = [
    ("cu int64", dict(cu_seqlens=lambda a: a["cu_seqlens"].long()), "cu_seqlens must have dtype"),
    ("cu 2d", dict(cu_seqlens=lambda a: a["cu_seqlens"][None]), "cu_seqlens must have 1 dimensions"),
    ("cu decreasing", dict(cu_seqlens=lambda a: torch.tensor([0, 5, 3], dtype=torch.int32)), "non-decreasing"),
    ("cu start", dict(cu_seqlens=lambda a: torch.tensor([1, 3, 7], dtype=torch.int32)), "start at 0"),
    ("cu past end", dict(cu_seqlens=lambda a: torch.tensor([0, 3, 9], dtype=torch.int32)), "cu_seqlens\\[-1\\]"),
    ("cu device", dict(cu_seqlens=lambda a: a["cu_seqlens"].to("meta")), "cu_seqlens is on meta"),
    ("max_seqlen", dict(max_seqlen=lambda a: 3), "max_seqlen \\(3\\) must be >="),
    ("max_seqlen type", dict(max_seqlen=lambda a: 4.0), "max_seqlen must be"),
    ("q ndim", dict(q=lambda a: a["q"][None]), "q must have 3 dimensions"),
    ("tokens", dict(k=lambda a: a["k"][:5], v=lambda a: a["v"][:5]), "sequence length"),
    ("groups", dict(k=lambda a: a["k"][:, :1].expand(-1, 3, -1), v=lambda a: a["v"][:, :1].expand(-1, 3, -1)),
     "multiple of k heads"),
    ("dtype", dict(q=lambda a: a["q"].half()), "k and v must have q's dtype"),
    ("head dim", dict(q=lambda a: a["q"][..., :8], k=lambda a: a["k"][..., :8], v=lambda a: a["v"][..., :8]),
     "head dim"),
    ("device", dict(v=lambda a: a["v"].to("meta")), "v is on meta"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises(case):
    _, change, match = case
    assert_bad_input_raises(causal_attention_varlen, _good_args(), change, match)


def test_cu_seqlens_checked_once_per_version(monkeypatch):
    """The same unmodified cu_seqlens is read on the host once (no sync per layer); an in-place change,
    another max_seqlen or another total is checked again, so a tensor made bad after passing still raises."""
    from rlhf_fast.ops import _attention_launch as launch

    args = _good_args()
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or real_tolist(t))
    for _ in range(3):
        launch.check_cu_seqlens(args["cu_seqlens"], args["max_seqlen"], args["q"].shape[0])
    assert len(reads) == 1
    launch.check_cu_seqlens(args["cu_seqlens"], args["max_seqlen"] + 1, args["q"].shape[0])
    assert len(reads) == 2
    args["cu_seqlens"][1] = 0
    args["cu_seqlens"][0] = 1  # in place: version bumps, so the check runs again
    with pytest.raises(ValueError, match="start at 0"):
        causal_attention_varlen(**args, backend="reference")
