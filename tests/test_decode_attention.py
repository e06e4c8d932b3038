"""decode_attention: split-K Triton kernel against float64 math with mixed cache lengths; bad input.

Tolerance as in test_causal_attention.py (tests/attention_helpers.py): FlashAttention's rule against
the plain math in the input dtype.
"""
import pytest
import torch

from attention_helpers import assert_attention_close, assert_bad_input_raises, attention_math
from conftest import need_backend
from rlhf_fast import decode_attention
from rlhf_fast.reference.decode_attention import decode_attention as reference

SEQLENS = (1, 33, 257)


def _inputs(b, hq, hkv, tmax, d, dtype, device):
    q = torch.randn(b, hq, d, dtype=dtype, device=device)
    k = torch.randn(b, hkv, tmax, d, dtype=dtype, device=device)
    v = torch.randn(b, hkv, tmax, d, dtype=dtype, device=device)
    return q, k, v


def _math_same_dtype(q, k, v, seqlens):
    """Per row, softmax(q k[:n]^T / sqrt(D)) v[:n] in q's dtype (no upcast): (B, Hq, D)."""
    return torch.stack([attention_math(q[b:b + 1, :, None], k[b:b + 1, :, :n], v[b:b + 1, :, :n], causal=False)[0, :, 0]
                        for b, n in enumerate(seqlens.tolist())])


def _check(q, k, v, seqlens):
    out = decode_attention(q, k, v, seqlens, backend="triton")
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = reference(q.double(), k.double(), v.double(), seqlens)
    assert_attention_close(out, ref, _math_same_dtype(q, k, v, seqlens), "out")


@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 1), (2, 2)], ids=["gqa4", "mqa", "mha"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
def test_mixed_cache_lengths(hq, hkv, dtype, d, device):
    need_backend("triton", device)
    seqlens = torch.tensor(SEQLENS, dtype=torch.int32, device=device)
    _check(*_inputs(3, hq, hkv, 300, d, dtype, device), seqlens)


@pytest.mark.parametrize("pick", [1, 2])
@pytest.mark.parametrize("arch", [80, 90])
def test_tuning_set_entries(arch, pick, device, monkeypatch):
    """The split kernel's public configs (kernels/decode_attention.split_tuning_set), as autotuning may
    launch them: each its own split length, merged by the combine kernel."""
    from rlhf_fast.ops import _attention_launch, _autotune

    need_backend("triton", device)
    if device.type == "cuda":
        pytest.skip("on a GPU the launcher times and runs the set itself")
    monkeypatch.setattr(_attention_launch, "arch_of", lambda _: arch)
    chosen = []
    monkeypatch.setattr(_autotune, "choose", lambda kernel, regime, candidates, run, dev, **kw:
                        chosen.append(candidates[pick]) or candidates[pick])
    seqlens = torch.tensor(SEQLENS, dtype=torch.int32, device=device)
    _check(*_inputs(3, 8, 2, 300, 64, torch.bfloat16, device), seqlens)
    assert len(chosen) == 1


def test_large_group_and_empty_row(device):
    """A group of 20 query heads spans two programs; a row with cache length 0 returns zeros."""
    need_backend("triton", device)
    q, k, v = _inputs(2, 20, 1, 40, 16, torch.float32, device)
    seqlens = torch.tensor([40, 0], dtype=torch.int32, device=device)
    out = decode_attention(q, k, v, seqlens, backend="triton")
    assert torch.all(out[1] == 0)
    _check(q[:1], k[:1], v[:1], seqlens[:1])


@pytest.mark.parametrize("lengths", [(40, 7, 0), (23, 23, 23), (40, 40, 40), (0, 0, 0)],
                         ids=["ragged", "equal-short", "full", "empty"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_slots_past_length_never_reach_the_output(backend, lengths, device):
    """NaN (or inf) in cache slots at or past cache_seqlens[b] is ignored by every backend; the rows
    equal those computed from a clean cache, and a row of length 0 stays 0. Rows all of one length
    (shorter than the cache or not) are the reference's unmasked CPU path."""
    need_backend(backend, device)
    q, k, v = _inputs(3, 4, 2, 40, 16, torch.float32, device)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    k_dirty, v_dirty = k.clone(), v.clone()
    for b, n in enumerate(seqlens.tolist()):
        k_dirty[b, :, n:] = float("nan")
        v_dirty[b, :, n:] = float("nan")
        if 20 >= n:
            v_dirty[b, :, 20] = float("inf")
    out = decode_attention(q, k_dirty, v_dirty, seqlens, backend=backend)
    assert not out.isnan().any() and torch.all(out[seqlens == 0] == 0)
    assert torch.equal(out, decode_attention(q, k, v, seqlens, backend=backend))
    _check_against(out, q, k, v, seqlens)


def _check_against(out, q, k, v, seqlens):
    """out against float64 math over the valid slots only (independent of the reference's masking)."""
    live = seqlens > 0
    if not live.any():
        assert torch.all(out == 0)
        return
    ref = torch.zeros_like(q, dtype=torch.float64)
    ref[live] = _math_same_dtype(q[live].double(), k[live].double(), v[live].double(), seqlens[live])
    same = torch.zeros_like(q)
    same[live] = _math_same_dtype(q[live], k[live], v[live], seqlens[live])
    assert_attention_close(out, ref, same, "out")


def test_strided_bthd_cache(device):
    """A (B, Tmax, Hkv, D) cache seen as (B, Hkv, Tmax, D) is read in place."""
    need_backend("triton", device)
    b, tmax, hkv, hq, d = 3, 70, 2, 4, 32
    k = torch.randn(b, tmax, hkv, d, device=device).transpose(1, 2)
    v = torch.randn(b, tmax, hkv, d, device=device).transpose(1, 2)
    q = torch.randn(b, 2 * hq, d, device=device)[:, ::2]
    _check(q, k, v, torch.tensor([70, 5, 33], dtype=torch.int32, device=device))


def test_reference_backend_matches_sdpa(device):
    q, k, v = _inputs(2, 4, 2, 9, 16, torch.float32, device)
    seqlens = torch.tensor([9, 4], dtype=torch.int32, device=device)
    out = decode_attention(q, k, v, seqlens, backend="reference", scale=0.2)
    for b, n in enumerate((9, 4)):
        want = torch.nn.functional.scaled_dot_product_attention(
            q[b, :, None], k[b, :, :n], v[b, :, :n], enable_gqa=True, scale=0.2)[:, 0]
        torch.testing.assert_close(out[b], want)


def test_torch_compile_fullgraph(device):
    need_backend("triton", device)
    q, k, v = _inputs(2, 4, 2, 20, 16, torch.float32, device)
    seqlens = torch.tensor([20, 7], dtype=torch.int32, device=device)
    fn = torch.compile(lambda *a: decode_attention(*a, backend="triton"), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(q, k, v, seqlens), decode_attention(q, k, v, seqlens, backend="triton"))


def _good_args():
    q, k, v = _inputs(2, 4, 2, 8, 16, torch.float32, "cpu")
    return dict(q=q, k_cache=k, v_cache=v, cache_seqlens=torch.tensor([8, 3], dtype=torch.int32))


BAD = [
    ("q ndim", dict(q=lambda a: a["q"][:, :, None]), "q must have 3 dimensions"),
    ("q dtype", dict(q=lambda a: a["q"].double()), "q must have dtype"),
    ("cache dtype", dict(k_cache=lambda a: a["k_cache"].half()), "k_cache must have dtype"),
    ("cache ndim", dict(v_cache=lambda a: a["v_cache"][0]), "v_cache must have 4 dimensions"),
    ("v shape", dict(v_cache=lambda a: a["v_cache"][:, :, :4]), "v_cache must have k_cache's shape"),
    ("batch", dict(k_cache=lambda a: a["k_cache"][:1], v_cache=lambda a: a["v_cache"][:1]), "batch size"),
    ("groups", dict(q=lambda a: a["q"][:, :3]), "multiple of k_cache heads"),
    ("head dim", dict(q=lambda a: a["q"][..., :8]), "head dim"),
    ("cache head dim", dict(k_cache=lambda a: a["k_cache"].repeat(1, 1, 1, 2),
                            v_cache=lambda a: a["v_cache"].repeat(1, 1, 1, 2)), "k_cache must have q's head dim"),
    ("seqlens dtype", dict(cache_seqlens=lambda a: a["cache_seqlens"].long()), "cache_seqlens must have dtype"),
    ("seqlens size", dict(cache_seqlens=lambda a: a["cache_seqlens"][:1]), "cache_seqlens must have q's batch"),
    ("device", dict(k_cache=lambda a: a["k_cache"].to("meta")), "k_cache is on meta"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises(case):
    _, change, match = case
    assert_bad_input_raises(decode_attention, _good_args(), change, match)
