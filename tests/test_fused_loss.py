"""fused_linear_token_loss (rlhf_fast/fused_loss.py) against float64 math.

The loss is PPO's clipped surrogate with an entropy bonus, weighted per token (a token mean with a
mask), applied to float64 logprobs from the materialized logits; "PyTorch in the same dtype" is the
same loss on the unfused fp32 logits of the inputs in their dtype (tests/parity.py). Both the one-pass
reference (the CPU default) and the op route (Triton, or any backend with cutoffs) are checked, and the
matmul count that makes the first worth having is measured, not assumed.
"""
import pytest
import torch

import rlhf_fast
from conftest import need_backend
from parity import assert_close_to_reference
from rlhf_fast.fused_loss import fused_linear_token_loss
from test_filtered_logprobs import fused_inputs, fused_oracle
from test_fused_linear_logprobs import make_inputs, unfused

FP32, BF16 = torch.float32, torch.bfloat16
# (N, H, V, dtype, temperature, bias)
CASES = [(1, 16, 17, FP32, 1.0, True), (33, 32, 1000, FP32, 0.7, False), (33, 24, 1000, BF16, 1.0, True),
         (300, 16, 17, BF16, 0.7, False), (70, 40, 300, FP32, 1.0, True)]


def ppo_loss_fn(old, adv, weights, clip=0.2, ent_coef=0.05):
    """PPO's clipped surrogate minus an entropy bonus, as a sum of per-token terms (weights: mask / count)."""
    def loss_fn(rows, logp, entropy):
        old_r, adv_r, w_r = (x[rows].to(logp.dtype) for x in (old, adv, weights))
        ratio = (logp - old_r).exp()
        pg = torch.maximum(-adv_r * ratio, -adv_r * ratio.clamp(1 - clip, 1 + clip))
        loss = (pg * w_r).sum()
        return loss if entropy is None else loss - ent_coef * (entropy * w_r).sum()
    return loss_fn


def loss_constants(n, targets, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    shift = 0.4 * torch.randn(n, generator=gen, dtype=torch.float64)  # ratios on both sides of the clip
    mask = (targets.cpu() != -100).double()
    weights = mask / mask.sum().clamp(min=1)
    return [x.to(device) for x in (adv, shift, weights)]


def unfused_loss(forward, leaves, targets, constants, with_entropy, old=None):
    """loss and gradients of the unfused path: forward(*leaves) -> (logp, entropy), then the same loss;
    old logprobs (default: this logp + the constants' shift) are returned for the other paths to share."""
    leaves = [None if t is None else t.clone().requires_grad_() for t in leaves]
    logp, entropy = forward(*leaves)
    adv, shift, weights = constants
    old = logp.detach().double() + shift if old is None else old
    loss = ppo_loss_fn(old, adv, weights)(slice(0, len(targets)), logp, entropy if with_entropy else None)
    loss.backward()
    return loss, logp, entropy, [None if t is None else t.grad for t in leaves], old


def ours(backend, leaves, targets, old, constants, with_entropy, **kw):
    leaves = [None if t is None else t.clone().requires_grad_() for t in leaves]
    adv, _, weights = constants
    loss, logp, entropy = fused_linear_token_loss(leaves[0], leaves[1], targets, ppo_loss_fn(old, adv, weights),
                                                  bias=leaves[2], return_entropy=with_entropy, backend=backend, **kw)
    loss.backward()
    return loss, logp, entropy, [None if t is None else t.grad for t in leaves]


def check(got, want64, same, dtype, targets, old, constants):
    """logp, entropy and gradients by the parity rule; the loss as loss_fn of the returned logp/entropy
    (in float64: a scalar sum of per-token errors has no max-error bound of its own)."""
    (loss, logp, entropy, grads), (_, logp64, ent64, grads64), (_, logp_t, ent_t, grads_t) = got, want64, same
    adv, _, weights = constants
    loss_of_ours = ppo_loss_fn(old, adv, weights)(slice(0, len(targets)), logp.double(),
                                                 None if entropy is None else entropy.double())
    # fp32 rounding of each of loss_fn's per-token terms (a few ulps each), over the terms' absolute sum
    lp64 = logp.double()
    terms = weights * (adv.abs() * (lp64 - old).exp() + (0 if entropy is None else entropy.double().abs()))
    torch.testing.assert_close(loss.double(), loss_of_ours, rtol=0, atol=8 * torch.finfo(FP32).eps * terms.sum().item())
    assert_close_to_reference(logp, logp64, logp_t, FP32, name="logp")
    if entropy is not None:
        assert_close_to_reference(entropy, ent64, ent_t, FP32, name="entropy")
    for name, g, g64, g_t in zip(("d_hidden", "d_weight", "d_bias"), grads, grads64, grads_t):
        if g64 is not None:
            assert g.dtype == dtype
            assert_close_to_reference(g, g64, g_t.to(dtype), dtype, name=name)
    assert (grads[0][targets == -100] == 0).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("with_entropy", [True, False], ids=["entropy", "logp"])
@pytest.mark.parametrize("n, h, vocab, dtype, temperature, with_bias", CASES,
                         ids=[f"N{n}-H{h}-V{v}-{str(d)[6:]}-T{t}-{'b' if b else 'nob'}" for n, h, v, d, t, b in CASES])
def test_loss_and_grads_match_float64(backend, with_entropy, n, h, vocab, dtype, temperature, with_bias, device):
    need_backend(backend, device)
    hidden, weight, bias, targets = make_inputs(n, h, vocab, dtype, device, with_bias)
    constants = loss_constants(n, targets, device)

    def plain(h_, w_, b_):
        return unfused(h_, w_, b_, targets, temperature)

    up = lambda t: None if t is None else t.double()  # noqa: E731
    *want64, old = unfused_loss(plain, [up(t) for t in (hidden, weight, bias)], targets, constants, with_entropy)
    *same, _ = unfused_loss(plain, (hidden, weight, bias), targets, constants, with_entropy, old)
    kw = {"chunk_size": 7} if backend == "reference" else {}
    got = ours(backend, (hidden, weight, bias), targets, old, constants, with_entropy, temperature=temperature, **kw)
    check(got, want64, same, dtype, targets, old, constants)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cutoffs_match_float64(backend, device):
    """With a sampler's kept sets the loss is over the filtered logprobs (through the op on every backend)."""
    need_backend(backend, device)
    n, temperature = 29, 0.7
    hidden, weight, bias, targets, cutoffs, kept = fused_inputs(n, 32, 500, FP32, temperature, True, device)
    constants = loss_constants(n, targets, device)

    def plain(h_, w_, b_):
        return fused_oracle(h_, w_, b_, targets, temperature, kept)

    *want64, old = unfused_loss(plain, [t.double() for t in (hidden, weight, bias)], targets, constants, True)
    *same, _ = unfused_loss(plain, (hidden, weight, bias), targets, constants, True, old)
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


@pytest.mark.parametrize("frozen_weight", [False, True], ids=["trained-weight", "frozen-weight"])
def test_reference_pass_takes_one_matmul_less_than_forward_plus_backward(frozen_weight):
    """The point of the composite: 3 (N, H, V) matmuls (2 with a frozen lm_head) where the op's forward
    and backward take 4 (3), the same count as the unfused path that keeps its (N, V) softmax."""
    n, h, vocab = 64, 32, 1000  # rows and chunks in multiples of 8: no padded BLAS rows in the count
    hidden, weight, _, targets = make_inputs(n, h, vocab, FP32, "cpu", False)
    weight.requires_grad_(not frozen_weight)
    hidden.requires_grad_()
    constants = loss_constants(n, targets, "cpu")
    loss_fn = ppo_loss_fn(torch.zeros(n, dtype=torch.float64), constants[0], constants[2])
    per = 2 * n * h * vocab

    def composite():
        fused_linear_token_loss(hidden, weight, targets, loss_fn, return_entropy=True, chunk_size=16,
                                backend="reference")[0].backward()

    def op_then_loss():
        logp, ent = rlhf_fast.fused_linear_logprobs(hidden, weight, targets, return_entropy=True, chunk_size=16,
                                                    backend="reference")
        loss_fn(slice(0, n), logp, ent).backward()

    want = 2 if frozen_weight else 3
    assert matmul_flops(composite) == want * per
    assert matmul_flops(op_then_loss) == (want + 1) * per


def test_backward_scales_the_forwards_gradients(device):
    hidden, weight, bias, targets = make_inputs(40, 16, 300, FP32, device, True)
    constants = loss_constants(40, targets, device)
    loss_fn = ppo_loss_fn(torch.zeros(40, dtype=torch.float64, device=device), constants[0], constants[2])
    grads = []
    for scale in (1.0, -2.5):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss, _, _ = fused_linear_token_loss(leaves[0], leaves[1], targets, loss_fn, bias=leaves[2],
                                             backend="reference")
        (loss * scale).backward()
        grads.append([t.grad for t in leaves])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g2, g1 * -2.5, rtol=0, atol=0)


def test_bad_input_raises(device):
    hidden, weight, _, targets = make_inputs(8, 16, 50, FP32, device, False)

    def per_row(rows, logp, entropy):
        return logp  # (n,), not the rows' loss

    with pytest.raises(ValueError, match="loss_fn must be callable"):
        fused_linear_token_loss(hidden, weight, targets, "sum")
    for backend in ("reference", "triton"):
        if backend == "triton":
            need_backend(backend, device)
        with pytest.raises(ValueError, match="loss_fn must return a 0-dim tensor"):
            fused_linear_token_loss(hidden, weight.requires_grad_(), targets, per_row, backend=backend)
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_token_loss(hidden[0], weight, targets, lambda r, lp, e: lp.sum())
    with pytest.raises(ValueError, match="backend"):
        fused_linear_token_loss(hidden, weight, targets, lambda r, lp, e: lp.sum(), backend="cpu")
