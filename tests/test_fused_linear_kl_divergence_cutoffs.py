"""fused_linear_kl_divergence with `cutoffs` (the sampler's kept sets, see the CUTOFFS contract in the
op's docstring) and `targets`/`return_logprobs`, against an independent oracle written from the
contract (float64 log_softmax with -inf off K, autograd for the gradients), on both backends, under the
parity rule (tests/parity.py)."""
import pytest
import torch
import torch.nn.functional as F

import rlhf_fast
from conftest import need_backend
from parity import assert_close_to_reference
from rlhf_fast.reference import fused_linear_kl_divergence as ref
from test_fused_linear_kl_divergence import BACKENDS, BF16, FP32, make_inputs


def oracle_cut(policy, reference, temperature, cutoffs, targets=None, ignore_index=-100):
    """KL(pi_K || pi_ref_K) and the targets' log-probabilities, written from the contract: K is
    `x > t or (x == t and v >= i)` on the policy's float32 x = float32(logit) / T; both models' logits
    -inf off K, log_softmax (float64 for float64 inputs, else float32), p log(p/q) summed over K."""
    z, zr = F.linear(*policy), F.linear(*reference)
    if z.dtype != torch.float64:
        z, zr = z.float(), zr.float()
    x32 = F.linear(*[None if t is None else t.detach() for t in policy]).float() / temperature
    t, i = cutoffs[:, 0].float()[:, None], cutoffs[:, 1][:, None]
    cols = torch.arange(z.shape[1], device=z.device)[None, :]
    keep = (x32 > t) | ((x32 == t) & (cols >= i))
    lp = (z / temperature).masked_fill(~keep, float("-inf")).log_softmax(-1)
    lq = (zr / temperature).masked_fill(~keep, float("-inf")).log_softmax(-1)
    lp_k, lq_k = torch.where(keep, lp, 0.0), torch.where(keep, lq, 0.0)  # no 0 * (-inf - -inf) off K
    kl = (lp_k.exp() * (lp_k - lq_k) * keep).sum(-1)
    if targets is None:
        return kl, None, None
    valid = targets != ignore_index
    at = targets.clamp(min=0)[:, None]
    return (kl, torch.where(valid, lp.gather(1, at)[:, 0], 0.0).detach(),
            torch.where(valid, lq.gather(1, at)[:, 0], 0.0).detach())


def random_cutoffs(policy, temperature, sharp=False):
    """(N, 2) float64 cutoffs far (relative gap 1e-3) from every logit, as top-k cuts of random k, and
    rows (-inf, 0): no backend's rounding can move a token across them. sharp: keep 1 to 3 tokens."""
    x = (F.linear(*[None if t is None else t.double() for t in policy]) / temperature).sort(-1, descending=True)
    x = x.values
    n, vocab = x.shape
    cut = torch.tensor([[float("-inf"), 0.0]], dtype=torch.float64).repeat(n, 1)
    gap_ok = (x[:, :-1] - x[:, 1:]) > 1e-3 * x.abs().amax(-1, keepdim=True)
    for r in range(n):
        if r % 4 == 3 or vocab == 1:
            continue  # no filter
        k_want = int(torch.randint(1, 4 if sharp else vocab, ()).item())
        ks = torch.nonzero(gap_ok[r]).flatten() + 1  # cut between ranks k - 1 and k keeps k tokens
        if ks.numel():
            k = int(ks[(ks - k_want).abs().argmin()])
            cut[r, 0] = ((x[r, k - 1] + x[r, k]) / 2).float().item()
            cut[r, 1] = float(torch.randint(0, vocab, ()).item())  # no tie at t: i must not matter
    return cut.to(policy[0].device)


def kept_targets(policy, temperature, cutoffs, ignore_every=5):
    """A random kept token per row (decided as oracle_cut decides K), ignore_index on every 5th row."""
    x32 = F.linear(*policy).float() / temperature
    t, i = cutoffs[:, 0].float()[:, None], cutoffs[:, 1][:, None]
    cols = torch.arange(x32.shape[1], device=x32.device)[None, :]
    keep = (x32 > t) | ((x32 == t) & (cols >= i))
    targets = torch.multinomial(keep.double().cpu(), 1)[:, 0].to(x32.device)
    targets[::ignore_every] = -100
    return targets


def run_cut(fn, policy, reference, temperature, g, **kw):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in policy]
    kl, logp, ref_logp = fn(leaves, reference, temperature, **kw)
    (kl * g).sum().backward()
    return (kl, logp, ref_logp), [t.grad if t is not None else None for t in leaves]


def fused_cut(backend):
    def call(policy, reference, temperature, **kw):
        (h, w, b), (hr, wr, br) = policy, reference
        out = rlhf_fast.fused_linear_kl_divergence(h, w, hr, wr, bias=b, ref_bias=br, temperature=temperature,
                                                   backend=backend, **kw)
        return out if isinstance(out, tuple) else (out, None, None)
    return call


def check_against_oracle(backend, policy, reference, temperature, cutoffs, targets, dtype, device):
    g = torch.randn(policy[0].shape[0], device=device)
    kw = {"cutoffs": cutoffs, "targets": targets, "return_logprobs": targets is not None}
    if backend == "reference":
        kw["chunk_size"] = 5
    outs, grads = run_cut(fused_cut(backend), policy, reference, temperature, g, **kw)
    up = lambda ts: [None if t is None else t.double() for t in ts]  # noqa: E731
    outs64, grads64 = run_cut(lambda p, r, T: oracle_cut(p, r, T, cutoffs, targets), up(policy), up(reference),
                              temperature, g.double())
    outs_t, grads_t = run_cut(lambda p, r, T: oracle_cut(p, r, T, cutoffs, targets), policy, reference,
                              temperature, g)
    for name, ours, want, same in zip(("kl", "logp", "ref_logp"), outs, outs64, outs_t):
        if want is not None:
            assert ours.dtype == FP32 and not ours.requires_grad or name == "kl"
            assert_close_to_reference(ours, want, same, FP32, name=name)
    for name, ours, want, same in zip(("d_hidden", "d_weight", "d_bias"), grads, grads64, grads_t):
        if want is not None:
            assert_close_to_reference(ours, want, same, dtype, name=name)
    return outs, grads


# (N, H, H_ref, V, dtype, temperature, bias, sharp)
CUT_CASES = [(1, 16, 16, 17, FP32, 1.3, True, False), (17, 16, 24, 1000, FP32, 0.7, False, False),
             (33, 32, 16, 1000, BF16, 1.3, True, False), (17, 16, 16, 1, FP32, 0.7, True, False),
             (33, 16, 16, 17, BF16, 0.7, False, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, h, h_ref, vocab, dtype, temperature, with_bias, sharp", CUT_CASES,
                         ids=[f"N{n}-H{h}-HR{r}-V{v}-{str(d)[6:]}-T{t}-{'b' if b else 'nob'}{'-sharp' if s else ''}"
                              for n, h, r, v, d, t, b, s in CUT_CASES])
def test_cutoffs_match_float64_oracle(backend, n, h, h_ref, vocab, dtype, temperature, with_bias, sharp, device):
    need_backend(backend, device)
    policy, reference = make_inputs(n, h, h_ref, vocab, dtype, device, with_bias)
    cutoffs = random_cutoffs(policy, temperature, sharp)
    targets = kept_targets(policy, temperature, cutoffs)
    check_against_oracle(backend, policy, reference, temperature, cutoffs, targets, dtype, device)


def integer_inputs(n, h, vocab, dtype, device, with_bias):
    """Small-integer hidden/weight/bias: every logit is an exact integer in every dtype and summation
    order, so every backend's float32 x = z / T is the same bit pattern and a cut placed ON a logit
    (ties included) is seen identically by the kernels and the oracle. Rows of weight repeat, so many
    tokens tie."""
    def model():
        hidden = torch.randint(-2, 3, (n, h), device=device).to(dtype)
        weight = torch.randint(-2, 3, (max(vocab // 3, 1), h), device=device).to(dtype)
        weight = weight[torch.randint(0, weight.shape[0], (vocab,), device=device)]
        bias = torch.randint(-3, 4, (vocab,), device=device).to(dtype) if with_bias else None
        return hidden, weight, bias
    return model(), model()


def cuts_on_ties(policy, temperature):
    """Per row, t = the float32 x of a token with at least two ties where possible, and i = one of the
    tied indices (so the lower-index ties drop, the rest stay); every 4th row (-inf, 0), every 5th i = 0."""
    x32 = F.linear(*policy).float() / temperature
    n, vocab = x32.shape
    cut = torch.tensor([[float("-inf"), 0.0]], dtype=torch.float64).repeat(n, 1)
    for r in range(n):
        if r % 4 == 3:
            continue
        vals, counts = torch.unique(x32[r], return_counts=True)
        pick = vals[counts >= 2] if (counts >= 2).any() else vals
        t = pick[torch.randint(0, pick.numel(), ())]
        tied = torch.nonzero(x32[r] == t).flatten()
        i = 0 if r % 5 == 4 else int(tied[torch.randint(0, tied.numel(), ())])
        cut[r] = torch.tensor([float(t), float(i)], dtype=torch.float64)
    return cut.to(x32.device)


@pytest.mark.parametrize("backend", ["reference", "triton", "triton-reduce"])
@pytest.mark.parametrize("n, vocab, dtype, temperature", [(17, 1000, FP32, 0.7), (33, 17, BF16, 1.3)],
                         ids=["N17-V1000-float32-T0.7", "N33-V17-bfloat16-T1.3"])
def test_cutoffs_ties_at_the_cut(backend, n, vocab, dtype, temperature, device, monkeypatch):
    """The cut lands on tied logits: among the tokens with x == t only those of index >= i are kept."""
    if backend == "triton-reduce":
        monkeypatch.setenv("RLHF_FAST_FUSED_LINEAR_BWD", "reduce")
        backend = "triton"
    need_backend(backend, device)
    policy, _ = integer_inputs(n, 16, vocab, dtype, device, True)
    reference, _ = make_inputs(n, 24, 24, vocab, dtype, device, True)  # the reference's logits need no ties
    cutoffs = cuts_on_ties(policy, temperature)
    x32 = F.linear(*policy).float() / temperature
    assert ((x32 == cutoffs[:, :1].float()) & (torch.arange(vocab, device=device) < cutoffs[:, 1:])).any(), \
        "no tie below i: the test would not check the index rule"
    targets = kept_targets(policy, temperature, cutoffs)
    check_against_oracle(backend, policy, reference, temperature, cutoffs, targets, dtype, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cutoffs_keeping_a_few_tokens_across_vocab_splits(backend, device):
    """V = 3000: the Triton forward splits the vocab (3 tiles in the interpreter) and a cut keeping 1 to 3
    tokens leaves splits with no kept token on a row (m = -inf there). Integer inputs (exact logits):
    with random ones the KL of a few tokens is dominated by the logits' own rounding (any order of the
    H-sum moves it by ~1e-7 here), which PyTorch's fp32 path can cancel by chance, so the parity rule
    would compare matmul summation orders, not this op."""
    need_backend(backend, device)
    policy, reference = integer_inputs(2, 16, 3000, FP32, device, True)
    cutoffs = random_cutoffs(policy, 1.3, sharp=True)
    targets = kept_targets(policy, 1.3, cutoffs, ignore_every=100)
    check_against_oracle(backend, policy, reference, 1.3, cutoffs, targets, FP32, device)


def test_twin_with_cutoffs_equals_op(device):
    policy, reference = integer_inputs(9, 16, 40, FP32, device, True)
    cutoffs = cuts_on_ties(policy, 0.7)
    targets = kept_targets(policy, 0.7, cutoffs)
    (h, w, b), (hr, wr, br) = policy, reference
    kw = dict(bias=b, ref_bias=br, temperature=0.7, cutoffs=cutoffs, targets=targets, return_logprobs=True)
    got = rlhf_fast.fused_linear_kl_divergence(h.clone().requires_grad_(), w, hr, wr, backend="reference", **kw)
    twin = ref.fused_linear_kl_divergence(h.clone().requires_grad_(), w, hr, wr, **kw)
    for ours, theirs in zip(got, twin):
        assert torch.equal(ours.detach(), theirs.detach())
    for out in (got, twin):  # kl carries the gradient, the log-probabilities none
        assert out[0].requires_grad and not out[1].requires_grad and not out[2].requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_without_cutoffs_match_float64(backend, device):
    need_backend(backend, device)
    policy, reference = make_inputs(17, 16, 24, 1000, FP32, device, True)
    targets = torch.randint(0, 1000, (17,), device=device)
    targets[3] = -100
    no_cut = torch.tensor([[float("-inf"), 0.0]], dtype=torch.float64, device=device).repeat(17, 1)
    g = torch.randn(17, device=device)
    outs, grads = run_cut(fused_cut(backend), policy, reference, 1.3, g, targets=targets, return_logprobs=True)
    up = lambda ts: [None if t is None else t.double() for t in ts]  # noqa: E731
    outs64 = oracle_cut(up(policy), up(reference), 1.3, no_cut, targets)
    outs_t = oracle_cut(policy, reference, 1.3, no_cut, targets)
    for name, ours, want, same in zip(("kl", "logp", "ref_logp"), outs, outs64, outs_t):
        assert_close_to_reference(ours, want, same, FP32, name=name)
    assert outs[1][3] == 0 and outs[2][3] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_identical_models_with_cutoffs_have_zero_kl_and_gradient(backend, dtype, device):
    need_backend(backend, device)
    policy, _ = make_inputs(17, 16, 16, 1000, dtype, device, True)
    reference = [t.clone() for t in policy]
    cutoffs = random_cutoffs(policy, 0.7)
    g = torch.randn(17, device=device)
    (kl, _, _), grads = run_cut(fused_cut(backend), policy, reference, 0.7, g, cutoffs=cutoffs)
    assert kl.abs().max().item() <= 1e-6
    for grad in grads:
        assert grad.float().abs().max().item() <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_cutoff_rows_are_nan_and_off_k_targets_raise(backend, device):
    """A NaN cut (the sampler's invalid rows) keeps nothing: NaN KL on that row only. A target off its
    row's kept set raises, naming targets and cutoffs."""
    need_backend(backend, device)
    (h, w, b), (hr, wr, br) = make_inputs(5, 8, 8, 17, FP32, device, True)
    cutoffs = random_cutoffs((h, w, b), 1.0, sharp=True)
    cutoffs[2] = torch.tensor([float("nan"), 0.0], dtype=torch.float64)
    fk = rlhf_fast.fused_linear_kl_divergence
    kl = fk(h, w, hr, wr, bias=b, ref_bias=br, cutoffs=cutoffs, backend=backend)
    assert torch.isnan(kl[2]) and torch.isfinite(kl[[0, 1, 3, 4]]).all()
    w_nan = w.clone()
    w_nan[5, 0] = float("nan")  # one NaN logit per row stays in K: NaN rows as without cutoffs, not filtered
    assert torch.isnan(fk(h, w_nan, hr, wr, bias=b, ref_bias=br, cutoffs=cutoffs, backend=backend)).all()
    targets = kept_targets((h, w, b), 1.0, cutoffs.nan_to_num(nan=float("-inf")), ignore_every=100)
    targets[2] = -100
    fk(h, w, hr, wr, bias=b, ref_bias=br, cutoffs=cutoffs, targets=targets, return_logprobs=True, backend=backend)
    x = F.linear(h, w, b)
    off = x[0] < cutoffs[0, 0]
    assert off.any()
    targets[0] = int(torch.nonzero(off)[0])
    with pytest.raises(ValueError, match="targets must lie in their row's kept set.*row 0"):
        fk(h, w, hr, wr, bias=b, ref_bias=br, cutoffs=cutoffs, targets=targets, return_logprobs=True,
           backend=backend)


def test_bad_cutoffs_and_targets_raise(device):
    (h, w, b), (hr, wr, br) = make_inputs(4, 8, 6, 10, FP32, device, True)
    fk = rlhf_fast.fused_linear_kl_divergence
    cut = torch.zeros(4, 2, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="cutoffs must have dtype"):
        fk(h, w, hr, wr, cutoffs=cut.float())
    with pytest.raises(ValueError, match=r"cutoffs must have shape \(4, 2\)"):
        fk(h, w, hr, wr, cutoffs=cut[:3])
    with pytest.raises(ValueError, match="cutoffs must have 2 dimensions"):
        fk(h, w, hr, wr, cutoffs=cut[None])
    targets = torch.zeros(4, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="return_logprobs=True needs targets"):
        fk(h, w, hr, wr, return_logprobs=True)
    with pytest.raises(ValueError, match="targets is given but return_logprobs is False"):
        fk(h, w, hr, wr, targets=targets)
    with pytest.raises(ValueError, match="targets must have token count"):
        fk(h, w, hr, wr, targets=targets[:3], return_logprobs=True)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\)"):
        fk(h, w, hr, wr, targets=targets + 10, return_logprobs=True)


def test_compiles_with_cutoffs_and_logprobs(device):
    """torch.compile(fullgraph=True) traces the op with cutoffs and targets (register_fake's third output,
    the optional tensors) in one graph, and matches eager exactly (aot_eager, as tests/test_compile.py)."""
    policy, reference = integer_inputs(9, 8, 33, FP32, device, False)
    cutoffs = cuts_on_ties(policy, 0.7)
    targets = kept_targets(policy, 0.7, cutoffs)
    hidden = policy[0].clone().requires_grad_()

    def loss(hidden, weight, ref_hidden, ref_weight, cutoffs, targets):
        kl, logp, ref_logp = rlhf_fast.fused_linear_kl_divergence(hidden, weight, ref_hidden, ref_weight,
                                                                  temperature=0.7, cutoffs=cutoffs, targets=targets,
                                                                  return_logprobs=True)
        return kl.sum() + (logp - ref_logp).sum(), logp, ref_logp

    args = (hidden, policy[1], reference[0], reference[1], cutoffs, targets)
    explanation = torch._dynamo.explain(loss)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(*args)
    compiled[0].backward()
    grad, hidden.grad = hidden.grad, None
    eager = loss(*args)
    eager[0].backward()
    for ours, want in zip(compiled, eager):
        assert torch.equal(ours, want)
    assert torch.equal(grad, hidden.grad)
