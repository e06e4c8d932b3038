"""causal_attention: Triton forward and gradients against float64 math, GQA/MQA, strides, bad input.

Tolerance: FlashAttention's rule against the plain math in the input dtype, with the slack
tests/attention_helpers.py justifies.
"""
import pytest
import torch
import torch.nn.functional as F

from attention_helpers import EPS, check_against_float64, fwd_bwd
from conftest import need_backend
from rlhf_fast import causal_attention
from rlhf_fast.reference.causal_attention import causal_attention as reference


def _inputs(b, hq, hkv, t, d, dtype, device):
    q = torch.randn(b, hq, t, d, dtype=dtype, device=device)
    k = torch.randn(b, hkv, t, d, dtype=dtype, device=device)
    v = torch.randn(b, hkv, t, d, dtype=dtype, device=device)
    return q, k, v


@pytest.mark.parametrize("t", [1, 17, 128, 300])
@pytest.mark.parametrize("d", [16, 64, 128])
def test_mha_fp32_matches_float64(t, d, device):
    need_backend("triton", device)
    check_against_float64(*_inputs(1, 2, 2, t, d, torch.float32, device))


# (Hq, Hkv, T, D): MQA, GQA 4:1 and MHA over ragged and block-multiple lengths, the long case on GQA.
BF16_CASES = [(hq, hkv, t, d) for hq, hkv in ((4, 1), (8, 2), (2, 2)) for t, d in ((17, 64), (128, 128), (130, 16))]
BF16_CASES.append((8, 2, 300, 64))


@pytest.mark.parametrize("hq,hkv,t,d", BF16_CASES)
def test_heads_bf16_matches_float64(hq, hkv, t, d, device):
    need_backend("triton", device)
    check_against_float64(*_inputs(1, hq, hkv, t, d, torch.bfloat16, device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_dq_pass_matches_and_repeats(dtype, device):
    need_backend("triton", device)
    q, k, v = _inputs(1, 4, 1, 77, 32, dtype, device)
    check_against_float64(q, k, v, deterministic=True)
    do = torch.randn_like(q)
    first = fwd_bwd(causal_attention, q, k, v, do, backend="triton", deterministic=True)
    second = fwd_bwd(causal_attention, q, k, v, do, backend="triton", deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_strided_bthd_view(device):
    """A (B, T, H, D) tensor seen as (B, H, T, D) is read in place; the output keeps that layout."""
    need_backend("triton", device)
    b, t, hq, hkv, d = 2, 45, 4, 2, 32
    q = torch.randn(b, t, hq, d, device=device).transpose(1, 2)
    k = torch.randn(b, t, hkv, d, device=device).transpose(1, 2)
    v = torch.randn(b, t, hkv, 2 * d, device=device)[..., ::2].transpose(1, 2)  # unit-stride-free: copied
    assert not q.is_contiguous() and v.stride(-1) == 2
    out = causal_attention(q, k, v, backend="triton")
    assert out.stride() == q.stride()
    check_against_float64(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hq,hkv,t,d", [(2, 2, 1, 16), (4, 1, 17, 64), (8, 2, 130, 128), (2, 2, 64, 256)])
def test_reference_backend_on_cpu_matches_float64(hq, hkv, t, d, dtype):
    """The reference backend on CPU (torch's fused CPU attention; its backward from the saved out and lse)
    against float64 math, forward and gradients, MHA/GQA/MQA."""
    check_against_float64(*_inputs(2, hq, hkv, t, d, dtype, "cpu"), backend="reference")


def test_reference_backend_is_sdpa(device):
    q, k, v = _inputs(2, 4, 2, 19, 16, torch.float32, device)
    torch.testing.assert_close(causal_attention(q, k, v, backend="reference", scale=0.3),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.3))


def test_custom_scale(device):
    need_backend("triton", device)
    q, k, v = _inputs(1, 2, 1, 40, 16, torch.float32, device)
    out = causal_attention(q, k, v, scale=0.05, backend="triton")
    ref = reference(q.double(), k.double(), v.double(), scale=0.05)
    assert (out.double() - ref).abs().max().item() < EPS[torch.float32]


def test_torch_compile_fullgraph(device):
    """The custom ops (forward and backward) trace without a graph break."""
    need_backend("triton", device)
    q, k, v = (x.requires_grad_() for x in _inputs(1, 2, 1, 20, 16, torch.float32, device))
    fn = torch.compile(lambda q, k, v: causal_attention(q, k, v, backend="triton").sum(), fullgraph=True,
                       backend="aot_eager")
    fn(q, k, v).backward()
    eager = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    causal_attention(*eager, backend="triton").sum().backward()
    for a, b in zip((q, k, v), eager):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_opcheck(backend, device):
    need_backend(backend, device)
    from rlhf_fast.ops import causal_attention as op
    q, k, v = (x.requires_grad_() for x in _inputs(1, 2, 1, 9, 16, torch.float32, device))
    torch.library.opcheck(op._fwd, (q, k, v, 0.25, True, backend),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


BAD = [
    ("q", lambda q, k, v: (q[0], k, v), "q must have 4 dimensions"),
    ("dtype", lambda q, k, v: (q.double(), k.double(), v.double()), "q must have dtype"),
    ("k dtype", lambda q, k, v: (q, k.half(), v), "k and v must have q's dtype"),
    ("batch", lambda q, k, v: (q, k[:1], v[:1]), "batch size"),
    ("seq", lambda q, k, v: (q, k[:, :, :3], v[:, :, :3]), "sequence length"),
    ("v shape", lambda q, k, v: (q, k, v[:, :, :3]), "v must have k's shape"),
    ("head dim", lambda q, k, v: (q[..., :8], k[..., :8], v[..., :8]), "head dim"),
    ("head dim 48", lambda q, k, v: (q[..., :48], k[..., :48], v[..., :48]), "head dim"),
    ("k head dim", lambda q, k, v: (q, k[..., :32], v[..., :32]), "k must have q's head dim"),
    ("groups", lambda q, k, v: (q[:, :3], k, v), "multiple of k heads"),
    ("device", lambda q, k, v: (q, k.to("meta"), v), "k is on meta"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bad_input_raises(case, backend):
    _, make, match = case
    q, k, v = _inputs(2, 4, 2, 5, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match=match):
        causal_attention(*make(q, k, v), backend=backend)


def test_bad_scale_raises():
    q, k, v = _inputs(1, 2, 2, 5, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="scale must be"):
        causal_attention(q, k, v, scale=float("nan"))
