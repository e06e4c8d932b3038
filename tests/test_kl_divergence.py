"""kl_divergence against torch.distributions in float64, values and gradients for both inputs.

Parity rule (tests/parity.py): KL is fp32 math on the given logits, so PyTorch's error is that of
torch.distributions on the upcast logits; gradients are rounded once to each input's dtype.
"""
import pytest
import torch
from torch.distributions import Categorical
from torch.distributions import kl_divergence as torch_kl

import rlhf_fast
from conftest import need_backend
from parity import assert_close_to_reference
from rlhf_fast.reference import kl_divergence as ref

BACKENDS = ["reference", "triton"]
FP32, BF16 = torch.float32, torch.bfloat16
# (N, V, policy dtype, reference dtype, temperature)
CASES = [(1, 1, FP32, FP32, 1.0), (33, 17, FP32, FP32, 0.7), (33, 1000, BF16, BF16, 1.0),
         (33, 1000, BF16, FP32, 0.7), (300, 17, FP32, BF16, 1.0), (2, 50257, FP32, FP32, 0.7)]


def oracle(x, y, temperature):
    up = (lambda t: t) if x.dtype == torch.float64 else (lambda t: t.float())
    return torch_kl(Categorical(logits=up(x) / temperature), Categorical(logits=up(y) / temperature))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, vocab, dtype, ref_dtype, temperature", CASES,
                         ids=[f"N{n}-V{v}-{str(a)[6:]}-{str(b)[6:]}-T{t}" for n, v, a, b, t in CASES])
def test_matches_torch_distributions_float64(backend, n, vocab, dtype, ref_dtype, temperature, device):
    if backend == "triton" and n == 300 and device.type == "cpu":
        pytest.skip("N=300 rows run on the reference backend only in the interpreter (one program per row)")
    need_backend(backend, device)
    base = torch.randn(n, vocab, device=device) * 2
    logits = base.to(dtype)
    ref_logits = (base + torch.randn(n, vocab, device=device)).to(ref_dtype)
    g = torch.randn(n, device=device)

    x, y = logits.clone().requires_grad_(), ref_logits.clone().requires_grad_()
    kl = rlhf_fast.kl_divergence(x, y, temperature=temperature, backend=backend)
    (kl * g).sum().backward()
    x64, y64 = logits.double().requires_grad_(), ref_logits.double().requires_grad_()
    kl64 = oracle(x64, y64, temperature)
    (kl64 * g.double()).sum().backward()
    xs, ys = logits.clone().requires_grad_(), ref_logits.clone().requires_grad_()
    kl_t = oracle(xs, ys, temperature)
    (kl_t * g).sum().backward()

    assert kl.dtype == torch.float32 and x.grad.dtype == dtype and y.grad.dtype == ref_dtype
    assert_close_to_reference(kl, kl64, kl_t, torch.float32, name="kl")
    assert_close_to_reference(x.grad, x64.grad, xs.grad, dtype, name="d_logits")
    assert_close_to_reference(y.grad, y64.grad, ys.grad, ref_dtype, name="d_ref_logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_no_ref_grad_and_twin(backend, device):
    """(B, T, V) input; ref_logits without requires_grad gets none; the reference twin agrees."""
    need_backend(backend, device)
    logits = torch.randn(2, 3, 50, device=device)
    ref_logits = torch.randn(2, 3, 50, device=device)
    grads = []
    for fn, kw in ((rlhf_fast.kl_divergence, {"backend": backend}), (ref.kl_divergence, {})):
        x = logits.clone().requires_grad_()
        kl = fn(x, ref_logits, temperature=0.7, **kw)
        assert kl.shape == (2, 3) and (kl >= -1e-6).all()
        kl.sum().backward()
        grads.append((kl, x.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_identical_distributions_give_zero(device):
    logits = torch.randn(5, 77, device=device)
    kl = rlhf_fast.kl_divergence(logits, logits.clone())
    assert kl.abs().max() < 1e-5


def test_bad_input_raises(device):
    a = torch.randn(4, 10, device=device)
    with pytest.raises(ValueError, match="ref_logits must have the shape"):
        rlhf_fast.kl_divergence(a, a[:, :9])
    with pytest.raises(ValueError, match="logits must have dtype"):
        rlhf_fast.kl_divergence(a.long(), a)
    with pytest.raises(ValueError, match="ref_logits must have dtype"):
        rlhf_fast.kl_divergence(a, a.double())
    with pytest.raises(ValueError, match="ref_logits is on meta"):
        rlhf_fast.kl_divergence(a, a.to("meta"))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        rlhf_fast.kl_divergence(a, a, temperature=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        rlhf_fast.kl_divergence(a, a, backend="fast")
    for shape in ((4, 0), (0,)):  # an empty vocabulary, with and without rows
        with pytest.raises(ValueError, match="logits must have a vocabulary of at least 1 entry"):
            rlhf_fast.kl_divergence(a.new_zeros(shape), a.new_zeros(shape))


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_match_torch_distributions(backend, device):
    """Tokens with -inf logits in both models (masked vocabulary) add 0 to KL, as in torch.distributions."""
    need_backend(backend, device)
    a = torch.randn(3, 41, device=device) * 2
    b = a + torch.randn(3, 41, device=device)
    a[:, 29:] = b[:, 29:] = float("-inf")
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    kl = rlhf_fast.kl_divergence(x, y, temperature=0.8, backend=backend)
    kl.sum().backward()
    x64, y64 = a[:, :29].double().requires_grad_(), b[:, :29].double().requires_grad_()
    kl64 = oracle(x64, y64, 0.8)
    kl64.sum().backward()
    torch.testing.assert_close(kl.double(), kl64.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(x.grad[:, :29].double(), x64.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(y.grad[:, :29].double(), y64.grad, rtol=0, atol=1e-5)
    assert (x.grad[:, 29:] == 0).all() and (y.grad[:, 29:] == 0).all()
