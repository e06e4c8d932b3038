"""Oracle: token_logprobs, kl_divergence, their fused-linear forms and kl_penalty against trl's
functions, torch.distributions and float64 formulas, gradients included; -inf (masked vocabulary)
logits against torch.distributions' Categorical.

Errors against float64 follow tests/parity.py's rule with the atol each test states.
"""
import pytest
import torch
import torch.nn.functional as F

import rlhf_fast
from conftest import need_backend
from oracle_helpers import (KERNEL_BACKENDS, trl_entropy_from_logits, trl_selective_log_softmax,
                            xfail_interpreter_bf16)
from parity import assert_close_to_reference


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_and_entropy_vs_trl(backend, dtype, device):
    need_backend(backend, device)
    V, T = 301, 0.7
    for seed, shape, ignore_index in [(10, (2, 5), -100), (11, (9,), 7)]:
        g = torch.Generator().manual_seed(seed)
        logits = (torch.randn(*shape, V, generator=g) * 3).to(dtype)
        targets = torch.randint(0, V, shape, generator=g)
        ignored = torch.rand(shape, generator=g) < 0.3
        targets = targets.masked_fill(ignored, ignore_index)
        ignored = targets == ignore_index
        safe = targets.masked_fill(ignored, 0)
        x = logits.to(device).requires_grad_(True)
        logp, ent = rlhf_fast.token_logprobs(x, targets.to(device), temperature=T, return_entropy=True,
                                             ignore_index=ignore_index, backend=backend)
        w1, w2 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        (grad,) = torch.autograd.grad((logp * w1.to(device)).sum() + (ent * w2.to(device)).sum(), x)
        logp, ent, grad = logp.cpu(), ent.cpu(), grad.cpu()
        assert logp.dtype == torch.float32 and ent.dtype == torch.float32 and grad.dtype == dtype
        # trl on the same dtype (trl's usage divides the logits by T first), and float64 truth
        trl_lp = trl_selective_log_softmax(logits / T, safe)
        trl_ent = trl_entropy_from_logits(logits / T)
        z = (logits.double() / T).requires_grad_(True)
        lp64 = z.log_softmax(-1).gather(-1, safe[..., None]).squeeze(-1).masked_fill(ignored, 0)
        ent64 = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
        ent64_masked = ent64.masked_fill(ignored, 0)
        (g64,) = torch.autograd.grad((lp64 * w1).sum() + (ent64_masked * w2).sum(), z)
        g64 = g64 / T
        assert bool((logp[ignored] == 0).all()) and bool((ent[ignored] == 0).all())
        assert bool((grad[ignored] == 0).all())
        keep = ~ignored
        assert_close_to_reference(logp[keep], lp64[keep].detach(), trl_lp[keep], atol=2e-6, name="logp")
        assert_close_to_reference(ent[keep], ent64[keep].detach(), trl_ent[keep], atol=2e-6, name="entropy")
        # gradient: the same-dtype torch path is fp32 math cast to the input dtype
        xt = logits.clone().requires_grad_(True)
        zt = xt.float() / T
        lpt = zt.log_softmax(-1).gather(-1, safe[..., None]).squeeze(-1).masked_fill(ignored, 0)
        entt = -(zt.softmax(-1) * zt.log_softmax(-1)).sum(-1).masked_fill(ignored, 0)
        (gt,) = torch.autograd.grad((lpt * w1).sum() + (entt * w2).sum(), xt)
        assert_close_to_reference(grad, g64, gt, atol=1e-6, name="grad")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_divergence_vs_torch_distributions(backend, dtype, device, request):
    need_backend(backend, device)
    xfail_interpreter_bf16(request, backend, dtype, device, "kernels/kl_divergence.py stores d logits")
    V, T = 257, 1.3
    for seed, shape in [(20, (3, 3)), (21, (1,))]:
        g = torch.Generator().manual_seed(seed)
        a = (torch.randn(*shape, V, generator=g) * 2).to(dtype)
        b = (a.float() + torch.randn(*shape, V, generator=g)).to(dtype)
        xa, xb = a.to(device).requires_grad_(True), b.to(device).requires_grad_(True)
        kl = rlhf_fast.kl_divergence(xa, xb, temperature=T, backend=backend)
        w = torch.randn(shape, generator=g)
        ga, gb = torch.autograd.grad((kl * w.to(device)).sum(), (xa, xb))
        za, zb = (a.double() / T).requires_grad_(True), (b.double() / T).requires_grad_(True)
        kl64 = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=za),
                                                 torch.distributions.Categorical(logits=zb))
        ga64, gb64 = torch.autograd.grad((kl64 * w).sum(), (za, zb))
        ta, tb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        kl_t = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=ta.float() / T),
                                                 torch.distributions.Categorical(logits=tb.float() / T))
        gta, gtb = torch.autograd.grad((kl_t * w).sum(), (ta, tb))
        assert kl.dtype == torch.float32 and kl.shape == shape
        assert_close_to_reference(kl.cpu(), kl64.detach(), kl_t.detach(), atol=2e-6, name="kl")
        assert_close_to_reference(ga.cpu(), ga64 / T, gta, atol=1e-6, name="d logits")
        assert_close_to_reference(gb.cpu(), gb64 / T, gtb, atol=1e-6, name="d ref_logits")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_logprobs_vs_logits_path(backend, dtype, device):
    need_backend(backend, device)
    N, H, V, T = 13, 40, 301, 0.9
    g = torch.Generator().manual_seed(30)
    h = torch.randn(N, H, generator=g).to(dtype)
    W = (torch.randn(V, H, generator=g) / 3).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[2, 7]] = -100
    ins = [t.to(device).requires_grad_(True) for t in (h, W, bias)]
    logp, ent = rlhf_fast.fused_linear_logprobs(ins[0], ins[1], targets.to(device), bias=ins[2], temperature=T,
                                                return_entropy=True, backend=backend)
    w1, w2 = torch.randn(N, generator=g), torch.randn(N, generator=g)
    grads = torch.autograd.grad((logp * w1.to(device)).sum() + (ent * w2.to(device)).sum(), ins)
    # the logits path: linear in the input dtype, then token_logprobs (reference), and in float64
    ins_t = [t.clone().requires_grad_(True) for t in (h, W, bias)]
    lp_t, ent_t = rlhf_fast.token_logprobs(F.linear(*ins_t), targets, temperature=T, return_entropy=True,
                                           backend="reference")
    grads_t = torch.autograd.grad((lp_t * w1).sum() + (ent_t * w2).sum(), ins_t)
    ins64 = [t.double().requires_grad_(True) for t in (h, W, bias)]
    z = F.linear(*ins64) / T
    keep = targets != -100
    lp64 = z.log_softmax(-1).gather(-1, targets.clamp_min(0)[:, None]).squeeze(-1) * keep
    ent64 = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1) * keep
    grads64 = torch.autograd.grad((lp64 * w1).sum() + (ent64 * w2).sum(), ins64)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    assert_close_to_reference(logp.cpu(), lp64.detach(), lp_t.detach(), atol=atol, name="logp")
    assert_close_to_reference(ent.cpu(), ent64.detach(), ent_t.detach(), atol=atol, name="entropy")
    for name, ours, ref, same in zip(("d hidden", "d weight", "d bias"), grads, grads64, grads_t):
        assert ours.dtype == dtype
        assert_close_to_reference(ours.cpu(), ref, same, atol=atol, name=name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_linear_kl_divergence_vs_logits_path(backend, device):
    need_backend(backend, device)
    N, H, H_ref, V, T = 11, 24, 40, 263, 1.1
    g = torch.Generator().manual_seed(31)
    h, W, bias = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) / 3, torch.randn(V, generator=g)
    rh, rW, rb = torch.randn(N, H_ref, generator=g), torch.randn(V, H_ref, generator=g) / 4, torch.randn(V, generator=g)
    ins = [t.to(device).requires_grad_(True) for t in (h, W, bias)]
    kl = rlhf_fast.fused_linear_kl_divergence(ins[0], ins[1], rh.to(device), rW.to(device), bias=ins[2],
                                              ref_bias=rb.to(device), temperature=T, backend=backend)
    w = torch.randn(N, generator=g)
    grads = torch.autograd.grad((kl * w.to(device)).sum(), ins)
    ins64 = [t.double().requires_grad_(True) for t in (h, W, bias)]
    lp = (F.linear(*ins64) / T).log_softmax(-1)
    lq = (F.linear(rh.double(), rW.double(), rb.double()) / T).log_softmax(-1)
    kl64 = (lp.exp() * (lp - lq)).sum(-1)
    grads64 = torch.autograd.grad((kl64 * w).sum(), ins64)
    ins_t = [t.clone().requires_grad_(True) for t in (h, W, bias)]
    kl_t = rlhf_fast.kl_divergence(F.linear(*ins_t), F.linear(rh, rW, rb), temperature=T, backend="reference")
    grads_t = torch.autograd.grad((kl_t * w).sum(), ins_t)
    assert_close_to_reference(kl.cpu(), kl64.detach(), kl_t.detach(), atol=1e-5, name="kl")
    for name, ours, ref, same in zip(("d hidden", "d weight", "d bias"), grads, grads64, grads_t):
        assert_close_to_reference(ours.cpu(), ref, same, atol=1e-5, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_penalty_vs_float64_formulas(dtype, device):
    g = torch.Generator().manual_seed(40)
    logp = -torch.rand(3, 17, generator=g, dtype=torch.float64) * 5
    ref_logp = -torch.rand(3, 17, generator=g, dtype=torch.float64) * 5
    formulas = {"k1": lambda a, b: a - b, "k2": lambda a, b: 0.5 * (a - b) ** 2,
                "k3": lambda a, b: torch.exp(b - a) - 1 - (b - a)}
    for kind, f in formulas.items():
        a, b = logp.to(dtype).to(device).requires_grad_(True), ref_logp.to(dtype).to(device).requires_grad_(True)
        out = rlhf_fast.kl_penalty(a, b, kind, backend="reference")
        ga, gb = torch.autograd.grad(out.sum(), (a, b))
        a64, b64 = logp.clone().requires_grad_(True), ref_logp.clone().requires_grad_(True)
        want = f(a64, b64)
        wa, wb = torch.autograd.grad(want.sum(), (a64, b64))
        assert out.dtype == dtype
        tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(out.cpu().double(), want.detach(), **tol)
        torch.testing.assert_close(ga.cpu().double(), wa, **tol)
        torch.testing.assert_close(gb.cpu().double(), wb, **tol)
        if kind != "k1":
            assert bool((out >= 0).all())


LIVE = 29  # tokens LIVE.. of the 41-token vocabulary below are masked (-inf)


def _masked_vocab_logits(seed):
    """(3, 41) logits a and b = a + noise, both -inf past LIVE, and their generator for further draws."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 41, generator=g) * 2
    b = a + torch.randn(3, 41, generator=g)
    a[:, LIVE:] = b[:, LIVE:] = float("-inf")
    return a, b, g


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_masked_vocab_minus_inf_logits(backend, device):
    """Logits of -inf (a masked or padded vocabulary) are zero-probability tokens: 0 log 0 = 0, as in
    torch.distributions' Categorical.entropy() and kl_divergence; gradients stay finite."""
    need_backend(backend, device)
    T = 0.8
    a, _, g = _masked_vocab_logits(100)
    targets = torch.randint(0, LIVE, (3,), generator=g)
    x = a.to(device).requires_grad_(True)
    logp, ent = rlhf_fast.token_logprobs(x, targets.to(device), temperature=T, return_entropy=True, backend=backend)
    (grad,) = torch.autograd.grad(logp.sum() + ent.sum(), x)
    z = (a[:, :LIVE].double() / T).requires_grad_(True)
    cat = torch.distributions.Categorical(logits=z)
    lp64, ent64 = cat.logits.gather(-1, targets[:, None]).squeeze(-1), cat.entropy()
    (g64,) = torch.autograd.grad(lp64.sum() + ent64.sum(), z)
    torch.testing.assert_close(logp.cpu().double(), lp64.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.cpu().double(), ent64.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(grad.cpu()[:, :LIVE].double(), g64 / T, atol=1e-5, rtol=0)
    assert bool((grad.cpu()[:, LIVE:] == 0).all())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_masked_vocab_kl_divergence_vs_torch_distributions(backend, device):
    need_backend(backend, device)
    T = 0.8
    a, b, _ = _masked_vocab_logits(101)
    kl = rlhf_fast.kl_divergence(a.to(device), b.to(device), temperature=T, backend=backend)
    kl64 = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=a.double() / T),
                                             torch.distributions.Categorical(logits=b.double() / T))
    torch.testing.assert_close(kl.cpu().double(), kl64, atol=1e-5, rtol=0)
