"""kl_penalty: the k1/k2/k3 formulas against float64, their signs, and (for k1, k3) unbiasedness for
KL(pi || pi_ref) when tokens are drawn from pi."""
import pytest
import torch

import rlhf_fast
from parity import assert_close_to_reference


def formula64(logp, ref_logp, kind):
    d = logp.double() - ref_logp.double()
    r = torch.exp(-d)
    return {"k1": d, "k2": d * d / 2, "k3": (r - 1) - torch.log(r)}[kind]


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_formula_and_gradient(kind, dtype, device):
    logp = (-torch.rand(300, device=device) * 5).to(dtype)
    ref_logp = (logp.float() + torch.randn(300, device=device) * 0.5).to(dtype)
    a, b = logp.clone().requires_grad_(), ref_logp.clone().requires_grad_()
    out = rlhf_fast.kl_penalty(a, b, kind)
    out.sum().backward()
    a64, b64 = logp.double().requires_grad_(), ref_logp.double().requires_grad_()
    out64 = formula64(a64, b64, kind)
    out64.sum().backward()
    a_t, b_t = logp.clone().requires_grad_(), ref_logp.clone().requires_grad_()
    # PyTorch in the same dtype: the textbook formulas
    out_t = {"k1": lambda: a_t - b_t, "k2": lambda: (a_t - b_t) ** 2 / 2,
             "k3": lambda: torch.exp(b_t - a_t) - 1 - (b_t - a_t)}[kind]()
    out_t.sum().backward()
    assert out.dtype == dtype and out.shape == (300,)
    assert_close_to_reference(out, out64, out_t, name=kind)
    assert_close_to_reference(a.grad, a64.grad, a_t.grad, name=f"d{kind}/dlogp")
    assert_close_to_reference(b.grad, b64.grad, b_t.grad, name=f"d{kind}/dref_logp")
    if kind != "k1":
        assert (out >= 0).all()


def test_k3_is_exact_near_zero(device):
    """r ~ 1: (r - 1) - log r is ~d^2/2; expm1 keeps it (a naive exp(d) - 1 - d rounds to 0 or worse)."""
    logp = torch.full((4,), -2.0, device=device)
    ref_logp = logp + torch.tensor([1e-4, -1e-4, 3e-3, 0.0], device=device)
    out = rlhf_fast.kl_penalty(logp, ref_logp, "k3")
    want = formula64(logp, ref_logp, "k3")
    torch.testing.assert_close(out.double(), want, rtol=1e-3, atol=0)


def test_k1_and_k3_are_unbiased_for_kl(device):
    """Draw tokens from pi; the sample means of k1 and k3 match the exact KL(pi || pi_ref) within 5
    standard errors, while k2's mean is off by more (it is biased)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    logits = torch.randn(12, generator=gen, dtype=torch.float64) * 2
    ref_logits = logits + torch.randn(12, generator=gen, dtype=torch.float64) * 1.5
    logpi, logref = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    exact = (logpi.exp() * (logpi - logref)).sum().item()
    tokens = torch.multinomial(logpi.exp(), 400_000, replacement=True, generator=gen)
    lp, rp = logpi[tokens].to(device), logref[tokens].to(device)
    means = {}
    for kind in ("k1", "k2", "k3"):
        est = rlhf_fast.kl_penalty(lp, rp, kind)
        means[kind] = est.mean().item()
        stderr = est.std().item() / len(tokens) ** 0.5
        if kind != "k2":
            assert abs(means[kind] - exact) < 5 * stderr, (kind, means[kind], exact, stderr)
    assert abs(means["k2"] - exact) > 5 * rlhf_fast.kl_penalty(lp, rp, "k2").std().item() / len(tokens) ** 0.5


def test_bad_input_raises(device):
    a = torch.randn(5, device=device)
    with pytest.raises(ValueError, match="kind must be one of"):
        rlhf_fast.kl_penalty(a, a, "k4")
    with pytest.raises(ValueError, match="ref_logp must have the shape of logp"):
        rlhf_fast.kl_penalty(a, a[:4])
    with pytest.raises(ValueError, match="logp must have dtype"):
        rlhf_fast.kl_penalty(a.long(), a)
    with pytest.raises(ValueError, match="ref_logp is on meta"):
        rlhf_fast.kl_penalty(a, a.to("meta"))
    with pytest.raises(rlhf_fast.BackendUnavailable, match="no 'triton' backend"):
        rlhf_fast.kl_penalty(a, a, backend="triton")
