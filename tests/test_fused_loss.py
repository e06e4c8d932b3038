"""fused_linear_token_loss (rlhf_fast/fused_loss.py) against float64 math.

The loss is PPO's clipped surrogate with an entropy bonus, weighted per token (a token mean with a
mask), applied to float64 logprobs from the materialized logits; "PyTorch in the same dtype" is the
same loss on the unfused fp32 logits of the inputs in their dtype (tests/parity.py). Both the one-pass
reference (the CPU default) and the op route (Triton, or any backend with cutoffs) are checked, and the
matmul count that makes the first worth having is measured, not assumed.
"""
import pytest
import torch
import torch.nn.functional as F

import rlhf_fast
from conftest import need_backend
from parity import assert_close_to_reference
from rlhf_fast.fused_loss import TokenStats, fused_linear_token_loss
from test_filtered_logprobs import fused_inputs, fused_oracle
from test_fused_linear_logprobs import make_inputs, unfused

FP32, BF16 = torch.float32, torch.bfloat16
# (N, H, V, dtype, temperature, bias)
CASES = [(1, 16, 17, FP32, 1.0, True), (33, 32, 1000, FP32, 0.7, False), (33, 24, 1000, BF16, 1.0, True),
         (300, 16, 17, BF16, 0.7, False), (70, 40, 300, FP32, 1.0, True)]


def ppo_loss_fn(old, adv, weights, clip=0.2, ent_coef=0.05, kl_coef=0.3):
    """PPO's clipped surrogate minus an entropy bonus plus the exact KL to a reference (the latter two when
    given), as a sum of per-token terms (weights: mask / count)."""
    def loss_fn(rows, stats):
        logp = stats.logp
        old_r, adv_r, w_r = (x[rows].to(logp.dtype) for x in (old, adv, weights))
        ratio = (logp - old_r).exp()
        pg = torch.maximum(-adv_r * ratio, -adv_r * ratio.clamp(1 - clip, 1 + clip))
        loss = (pg * w_r).sum()
        if stats.entropy is not None:
            loss = loss - ent_coef * (stats.entropy * w_r).sum()
        if stats.kl is not None:
            loss = loss + kl_coef * (stats.kl * w_r).sum()
        return loss
    return loss_fn


def loss_constants(n, targets, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    shift = 0.4 * torch.randn(n, generator=gen, dtype=torch.float64)  # ratios on both sides of the clip
    mask = (targets.cpu() != -100).double()
    weights = mask / mask.sum().clamp(min=1)
    return [x.to(device) for x in (adv, shift, weights)]


def unfused_kl(hidden, weight, bias, ref, targets, temperature):
    """Per-token KL(softmax(z) || softmax(z_ref)) over the vocabulary, 0 on ignored rows, from the
    materialized logits (torch.distributions' formula); ref = (ref_hidden, ref_weight, ref_bias)."""
    z = F.linear(hidden, weight, bias)
    z = (z if z.dtype == torch.float64 else z.float()) / temperature
    zr = F.linear(*ref)
    zr = (zr if zr.dtype == torch.float64 else zr.float()) / temperature
    logp, logq = z.log_softmax(-1), zr.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return torch.where(targets != -100, kl, torch.zeros((), dtype=kl.dtype))


def unfused_loss(forward, leaves, targets, constants, old=None):
    """loss and gradients of the unfused path: forward(*leaves) -> TokenStats, then the same loss;
    old logprobs (default: this logp + the constants' shift) are returned for the other paths to share."""
    leaves = [None if t is None else t.clone().requires_grad_() for t in leaves]
    stats = forward(*leaves)
    adv, shift, weights = constants
    old = stats.logp.detach().double() + shift if old is None else old
    loss = ppo_loss_fn(old, adv, weights)(slice(0, len(targets)), stats)
    loss.backward()
    return loss, stats, [None if t is None else t.grad for t in leaves], old


def ours(backend, leaves, targets, old, constants, with_entropy, ref=None, **kw):
    leaves = [None if t is None else t.clone().requires_grad_() for t in leaves]
    adv, _, weights = constants
    ref_kw = {} if ref is None else dict(zip(("ref_hidden", "ref_weight", "ref_bias"), ref))
    loss, stats = fused_linear_token_loss(leaves[0], leaves[1], targets, ppo_loss_fn(old, adv, weights),
                                          bias=leaves[2], return_entropy=with_entropy, backend=backend, **ref_kw, **kw)
    assert (stats.entropy is not None) == with_entropy and (stats.kl is not None) == (ref is not None)
    loss.backward()
    return loss, stats, [None if t is None else t.grad for t in leaves]


def check(got, want64, same, dtype, targets, old, constants):
    """Statistics and gradients by the parity rule; the loss as loss_fn of the returned statistics
    (in float64: a scalar sum of per-token errors has no max-error bound of its own)."""
    (loss, stats, grads), (_, stats64, grads64), (_, stats_t, grads_t) = got, want64, same
    adv, _, weights = constants
    up = TokenStats(*(None if x is None else x.double() for x in stats))
    loss_of_ours = ppo_loss_fn(old, adv, weights)(slice(0, len(targets)), up)
    # fp32 rounding of each of loss_fn's per-token terms (a few ulps each), over the terms' absolute sum
    terms = weights * (adv.abs() * (up.logp - old).exp() + sum(x.abs() for x in up[1:] if x is not None))
    torch.testing.assert_close(loss.double(), loss_of_ours, rtol=0, atol=8 * torch.finfo(FP32).eps * terms.sum().item())
    for name, x, x64, x_t in zip(TokenStats._fields, stats, stats64, stats_t):
        if x is not None:
            assert_close_to_reference(x, x64, x_t, FP32, name=name)
    for name, g, g64, g_t in zip(("d_hidden", "d_weight", "d_bias"), grads, grads64, grads_t):
        if g64 is not None:
            assert g.dtype == dtype
            assert_close_to_reference(g, g64, g_t.to(dtype), dtype, name=name)
    assert (grads[0][targets == -100] == 0).all()


def ref_head(n, h_ref, vocab, dtype, device, with_bias):
    """A reference model's hidden states and lm_head near the policy's scale (so the KL is O(0.1-1))."""
    hidden, weight, bias, _ = make_inputs(n, h_ref, vocab, dtype, device, with_bias)
    return hidden, weight, bias


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("stats", ["logp", "entropy", "entropy+kl", "kl"])
@pytest.mark.parametrize("n, h, vocab, dtype, temperature, with_bias", CASES,
                         ids=[f"N{n}-H{h}-V{v}-{str(d)[6:]}-T{t}-{'b' if b else 'nob'}" for n, h, v, d, t, b in CASES])
def test_loss_and_grads_match_float64(backend, stats, n, h, vocab, dtype, temperature, with_bias, device):
    need_backend(backend, device)
    hidden, weight, bias, targets = make_inputs(n, h, vocab, dtype, device, with_bias)
    with_entropy = "entropy" in stats
    ref = ref_head(n, h + 8, vocab, dtype, device, with_bias) if "kl" in stats else None
    constants = loss_constants(n, targets, device)

    def plain(h_, w_, b_):
        logp, entropy = unfused(h_, w_, b_, targets, temperature)
        kl = None if ref is None else unfused_kl(h_, w_, b_, [None if x is None else x.to(h_.dtype) for x in ref],
                                                 targets, temperature)
        return TokenStats(logp, entropy if with_entropy else None, kl)

    up = lambda t: None if t is None else t.double()  # noqa: E731
    *want64, old = unfused_loss(plain, [up(t) for t in (hidden, weight, bias)], targets, constants)
    *same, _ = unfused_loss(plain, (hidden, weight, bias), targets, constants, old)
    kw = {"chunk_size": 7} if backend == "reference" else {}
    got = ours(backend, (hidden, weight, bias), targets, old, constants, with_entropy, ref, temperature=temperature,
               **kw)
    check(got, want64, same, dtype, targets, old, constants)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cutoffs_match_float64(backend, device):
    """With a sampler's kept sets the loss is over the filtered logprobs (through the op on every backend)."""
    need_backend(backend, device)
    n, temperature = 29, 0.7
    hidden, weight, bias, targets, cutoffs, kept = fused_inputs(n, 32, 500, FP32, temperature, True, device)
    constants = loss_constants(n, targets, device)

    def plain(h_, w_, b_):
        return TokenStats(*fused_oracle(h_, w_, b_, targets, temperature, kept), None)

    *want64, old = unfused_loss(plain, [t.double() for t in (hidden, weight, bias)], targets, constants)
    *same, _ = unfused_loss(plain, (hidden, weight, bias), targets, constants, old)
    got = ours(backend, (hidden, weight, bias), targets, old, constants, True, temperature=temperature,
               cutoffs=cutoffs)
    check(got, want64, same, FP32, targets, old, constants)


def matmul_flops(fn) -> int:
    """FLOPs of the matmuls fn runs, custom ops' insides included (the profiler sees them; torch's
    FlopCounterMode stops at a custom op and does not count in-place addmm_)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    total = 0
    for event in prof.events():
        if event.name in ("aten::mm", "aten::addmm", "aten::addmm_"):
            a, b = event.input_shapes[:2] if event.name == "aten::mm" else event.input_shapes[1:3]
            total += 2 * a[0] * a[1] * b[1]
    return total


@pytest.mark.parametrize("with_kl", [False, True], ids=["logprobs", "kl"])
@pytest.mark.parametrize("frozen_weight", [False, True], ids=["trained-weight", "frozen-weight"])
def test_reference_pass_takes_fewer_matmuls_than_forward_plus_backward(frozen_weight, with_kl):
    """The point of the composite: 3 (N, H, V) matmuls (2 with a frozen lm_head) where the logprob op's
    forward and backward take 4 (3), the count of the unfused path that keeps its (N, V) softmax; with a
    reference, 4 (3) where the KL op takes 6 (5)."""
    n, h, vocab = 64, 32, 1000  # rows and chunks in multiples of 8: no padded BLAS rows in the count
    hidden, weight, _, targets = make_inputs(n, h, vocab, FP32, "cpu", False)
    ref_hidden, ref_weight, _ = ref_head(n, h, vocab, FP32, "cpu", False)
    weight.requires_grad_(not frozen_weight)
    hidden.requires_grad_()
    constants = loss_constants(n, targets, "cpu")
    loss_fn = ppo_loss_fn(torch.zeros(n, dtype=torch.float64), constants[0], constants[2])
    ref_kw = {"ref_hidden": ref_hidden, "ref_weight": ref_weight} if with_kl else {}

    def composite():
        fused_linear_token_loss(hidden, weight, targets, loss_fn, return_entropy=not with_kl, chunk_size=16,
                                backend="reference", **ref_kw)[0].backward()

    def ops_then_loss():
        if with_kl:
            kl = rlhf_fast.fused_linear_kl_divergence(hidden, weight, ref_hidden, ref_weight, chunk_size=16,
                                                      backend="reference")
            (kl * constants[2]).sum().backward()
            return
        logp, ent = rlhf_fast.fused_linear_logprobs(hidden, weight, targets, return_entropy=True, chunk_size=16,
                                                    backend="reference")
        loss_fn(slice(0, n), TokenStats(logp, ent, None)).backward()

    per, trained = 2 * n * h * vocab, int(not frozen_weight)
    assert matmul_flops(composite) == (2 + int(with_kl) + trained) * per
    assert matmul_flops(ops_then_loss) == ((3 + trained) if not with_kl else (5 + trained)) * per


def test_backward_scales_the_forwards_gradients(device):
    hidden, weight, bias, targets = make_inputs(40, 16, 300, FP32, device, True)
    constants = loss_constants(40, targets, device)
    loss_fn = ppo_loss_fn(torch.zeros(40, dtype=torch.float64, device=device), constants[0], constants[2])
    grads = []
    for scale in (1.0, -2.5):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss, _ = fused_linear_token_loss(leaves[0], leaves[1], targets, loss_fn, bias=leaves[2],
                                          backend="reference")
        (loss * scale).backward()
        grads.append([t.grad for t in leaves])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g2, g1 * -2.5, rtol=0, atol=0)


def test_bad_input_raises(device):
    hidden, weight, _, targets = make_inputs(8, 16, 50, FP32, device, False)

    def per_row(rows, stats):
        return stats.logp  # (n,), not the rows' loss

    with pytest.raises(ValueError, match="loss_fn must be callable"):
        fused_linear_token_loss(hidden, weight, targets, "sum")
    for backend in ("reference", "triton"):
        if backend == "triton":
            need_backend(backend, device)
        with pytest.raises(ValueError, match="loss_fn must return a 0-dim tensor"):
            fused_linear_token_loss(hidden, weight.requires_grad_(), targets, per_row, backend=backend)
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_token_loss(hidden[0], weight, targets, lambda rows, stats: stats.logp.sum())
    with pytest.raises(ValueError, match="backend"):
        fused_linear_token_loss(hidden, weight, targets, lambda rows, stats: stats.logp.sum(), backend="cpu")
