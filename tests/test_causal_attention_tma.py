"""The forward's TMA path (K/V read through tensor descriptors, on by default on Hopper) against float64.

RLHF_FAST_ATTN_TMA=1 turns the path on for CPU tensors, where Triton's interpreter runs the descriptor
loads (zero fill past the tensor, as TMA does); on a Hopper GPU it is the default, and =0 gives the
pointer path of the same kernel. Tolerance as in test_causal_attention.py (tests/attention_helpers.py).
"""
import pytest
import torch

from attention_helpers import assert_attention_close, attention_math, check_against_float64
from conftest import need_backend
from rlhf_fast import causal_attention, causal_attention_varlen
from rlhf_fast.ops import _attention_launch as launch
from rlhf_fast.reference.causal_attention import causal_attention as reference


@pytest.fixture
def tma(monkeypatch):
    """Force the TMA path; yields the list of descriptors the launcher made (None: no descriptor)."""
    monkeypatch.setenv("RLHF_FAST_ATTN_TMA", "1")
    made = []

    def spy(*args):
        made.append(real(*args))
        return made[-1]

    real = launch.kv_descriptor
    monkeypatch.setattr(launch, "kv_descriptor", spy)
    return made


def _assert_descriptors_made(q, made):
    """K and V went through descriptors, wherever the launcher uses them for q's dtype and device."""
    if q.device.type != "cuda" or launch.tma_wanted(launch.arch_of(q.device),
                                                    launch.table_dtype(q.dtype, q.device), q.device):
        assert len(made) == 2 and all(d is not None for d in made), made


def _check_forward(q, k, v):
    out = causal_attention(q, k, v, backend="triton")
    ref64 = reference(q.double(), k.double(), v.double())
    assert_attention_close(out, ref64, attention_math(q, k, v), "out")


@pytest.mark.parametrize("t,d,hq,hkv", [(1, 16, 2, 2), (17, 64, 4, 1), (300, 16, 4, 2), (129, 128, 2, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_padded_forward_matches_float64(tma, t, d, hq, hkv, dtype, device):
    need_backend("triton", device)
    q, k, v = (torch.randn(2, h, t, d, dtype=dtype, device=device) for h in (hq, hkv, hkv))
    _check_forward(q, k, v)
    _assert_descriptors_made(q, tma)


def test_strided_view_and_gradients(tma, device):
    """A (B, T, H, D) tensor viewed as (B, H, T, D) goes to the descriptor with its strides; the LSE the TMA
    forward saves drives the backward."""
    need_backend("triton", device)
    q, k, v = (torch.randn(2, 77, h, 32, device=device).transpose(1, 2) for h in (4, 2, 2))
    check_against_float64(q, k, v)
    _assert_descriptors_made(q, tma)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_forward_ignores_rows_outside_each_sequence(tma, dtype, device):
    """A descriptor spans the whole packed tensor, so the last key block of a sequence reads the next
    sequence's rows (and, past cu_seqlens[-1], whatever is there: NaN here). None of it may leak in."""
    need_backend("triton", device)
    lengths, extra, hq, hkv, d = (1, 5, 64, 100), 7, 4, 2, 64
    total = sum(lengths) + extra
    q, k, v = (torch.randn(total, h, d, dtype=dtype, device=device) for h in (hq, hkv, hkv))
    for x in (q, k, v):
        x[sum(lengths):] = float("nan")
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    out = causal_attention_varlen(q, k, v, cu, max(lengths), backend="triton")
    assert torch.all(out[sum(lengths):] == 0)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seq = [x[s:e].transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
        ref64 = reference(*(x.double() for x in seq)).squeeze(0).transpose(0, 1)
        same = attention_math(*seq).squeeze(0).transpose(0, 1)
        assert_attention_close(out[s:e], ref64, same, f"sequence of length {e - s}")


def test_tma_and_pointer_paths_agree(monkeypatch, device):
    need_backend("triton", device)
    q, k, v = (torch.randn(1, h, 150, 64, dtype=torch.bfloat16, device=device) for h in (4, 1, 1))
    monkeypatch.setenv("RLHF_FAST_ATTN_TMA", "1")
    with_tma = causal_attention(q, k, v, backend="triton")
    monkeypatch.setenv("RLHF_FAST_ATTN_TMA", "0")
    without = causal_attention(q, k, v, backend="triton")
    ref64 = reference(q.double(), k.double(), v.double())
    same = attention_math(q, k, v)
    assert_attention_close(with_tma, ref64, same, "out (TMA)")
    assert_attention_close(without, ref64, same, "out (pointers)")


def test_unaligned_tensor_falls_back_to_pointers(tma, device):
    """TMA needs a 16-byte aligned base and strides: a view starting one element in gets no descriptor
    (and the kernel its pointer path) rather than an error."""
    need_backend("triton", device)
    pytest.importorskip("triton.tools.tensor_descriptor")
    flat = torch.randn(1 + 2 * 33 * 16, device=device)
    k = flat[1:].view(1, 2, 33, 16)
    assert launch.kv_descriptor(k, False, [1, 1, 16, 16]) is None
    assert launch.kv_descriptor(k.clone(), False, [1, 1, 16, 16]) is not None
    q = torch.randn(1, 2, 33, 16, device=device)
    _check_forward(q, k, k)


def test_bad_env_value_raises(monkeypatch, device):
    need_backend("triton", device)
    monkeypatch.setenv("RLHF_FAST_ATTN_TMA", "yes")
    q = torch.randn(1, 1, 4, 16, device=device)
    with pytest.raises(ValueError, match="RLHF_FAST_ATTN_TMA"):
        causal_attention(q, q, q, backend="triton")


def test_zero_stride_views_fall_back_to_pointers(tma, device):
    """Issue 17.7: an expanded K/V view (stride 0 over batch or heads, as a broadcast GQA cache is) passes
    the 16-byte alignment test, since 0 % 16 == 0, yet TMA needs positive strides: no descriptor, the
    pointer path, and the float64 answer."""
    need_backend("triton", device)
    pytest.importorskip("triton.tools.tensor_descriptor")
    base = torch.randn(1, 1, 33, 16, dtype=torch.bfloat16, device=device)
    for k in (base.expand(2, 2, 33, 16), base.expand(1, 2, 33, 16)):
        assert 0 in k.stride()
        assert launch.kv_descriptor(k, False, [1, 1, 16, 16]) is None
        assert launch.kv_descriptor(k.contiguous(), False, [1, 1, 16, 16]) is not None
        q = torch.randn(k.shape[0], 2, 33, 16, dtype=torch.bfloat16, device=device)
        _check_forward(q, k, k)
