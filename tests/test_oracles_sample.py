"""Oracle: rlhf_fast.sample / sample_from_probs against transformers' logits warpers.

Temperature -> TopK -> TopP -> MinP (min_tokens_to_keep=1) give the distribution each row must be
drawn from: draws stay in the warpers' support, likely tokens are all drawn, counts pass a chi-square
test, and logprobs (and their gradients) match the warpers' log-probabilities.
"""
import contextlib
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import rlhf_fast
from conftest import need_backend
from oracle_helpers import SAMPLE_BACKENDS


@contextlib.contextmanager
def stable_torch_sort():
    """TopPLogitsWarper sorts with torch.sort(scores), not stable: on CPU (torch 2.13, checked) rows over
    16 tokens come back with tied values in arbitrary order, so which tokens of a tie straddling its cut
    it removes is arbitrary (how many is not). With a stable sort they are in index order and the lowest
    indices go first: the rule rlhf_fast implements."""
    sort = torch.sort
    with mock.patch.object(torch, "sort", lambda *args, **kw: sort(*args, **{**kw, "stable": True})):
        yield


def hf_warped_probs(logits, temperature, top_k, top_p, min_p, stable=True):
    """float32 (B, V) softmax of transformers' warpers (min_tokens_to_keep=1) in the documented order.

    Scalars apply to every row; (B,) tensors are applied row by row (the warpers take scalars).
    stable: TopPLogitsWarper's sort is made stable (see stable_torch_sort).
    """
    B = logits.shape[0]
    rows = []
    for b in range(B):
        pick = [v[b].item() if isinstance(v, torch.Tensor) else v for v in (temperature, top_k, top_p, min_p)]
        t, k, p, m = pick
        s = logits[b:b + 1].float()
        if t == 0:
            rows.append(F.one_hot(s.argmax(-1), s.shape[-1]).float())
            continue
        ids = torch.zeros((1, 1), dtype=torch.long)
        s = TemperatureLogitsWarper(float(t))(ids, s)
        if k > 0:
            s = TopKLogitsWarper(int(k))(ids, s)
        with stable_torch_sort() if stable else contextlib.nullcontext():
            s = TopPLogitsWarper(float(p))(ids, s)
        if m > 0:
            s = MinPLogitsWarper(float(m))(ids, s)
        rows.append(s.softmax(-1))
    return torch.cat(rows)


def draw_many(x, n, backend, **kw):
    """n draws from one (V,) row: the row repeated n times (each row has its own Philox counter)."""
    return rlhf_fast.sample(x[None].expand(n, -1).contiguous(), return_logprobs=True, backend=backend, **kw)


def _tie_logits(seed, V, device):
    """Random logits with a duplicated value exactly at the 5th-largest (top-k = 5 boundary)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(V, generator=g) * 2
    order = x.argsort(descending=True)
    x[order[5]] = x[order[4]]
    x[order[6]] = x[order[4]]
    return x.to(device)


def _check_draws(x, want, tokens, logprobs, n, label):
    """Draws of one row vs the warpers' probabilities `want` (V,) float64."""
    tokens, logprobs = tokens.cpu(), logprobs.cpu()
    counts = torch.bincount(tokens, minlength=x.shape[-1]).double()
    assert bool((counts[want == 0] == 0).all()), f"drew outside the warpers' support {label}"
    torch.testing.assert_close(logprobs.double(), want.log()[tokens], atol=1e-5, rtol=0)
    # every token kept with p > 8 / n is drawn (miss chance < e^-8 per token)
    assert bool((counts[want > 8 / n] > 0).all()), label
    keep = want > 0
    if int(keep.sum()) > 1:  # chi-square goodness of fit on the kept tokens, 1e-6 false-alarm level
        from scipy.stats import chi2 as chi2_dist
        expected = want[keep] * n
        chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
        assert chi2_dist.sf(chi2, int(keep.sum()) - 1) > 1e-6, f"chi2={chi2:.1f} for {label}"


@pytest.mark.parametrize("backend", SAMPLE_BACKENDS)
@pytest.mark.parametrize("seed", [1, 2])
def test_sample_distribution_and_support_vs_warpers(backend, seed, device):
    """Ties at the top-k boundary (kept by both), each filter and their combination."""
    need_backend(backend, device)
    V = 29
    x = _tie_logits(seed, V, device)
    configs = [(0.7, 5, 1.0, 0.0, 20000 if seed == 1 else 3000), (1.3, 0, 0.8, 0.0, 3000), (1.0, 0, 1.0, 0.1, 3000),
               (0.9, 3, 0.9, 0.05, 3000), (1.0, 40, 1.0, 0.0, 3000)]
    for t, k, p, m, n in configs:
        want = hf_warped_probs(x[None].cpu(), t, k, p, m)[0].double()
        tokens, logprobs = draw_many(x, n, backend, temperature=t, top_k=k, top_p=p, min_p=m, seed=seed)
        _check_draws(x, want, tokens, logprobs, n, (t, k, p, m))


@pytest.mark.parametrize("backend", SAMPLE_BACKENDS)
def test_sample_per_row_params_extreme_temperatures(backend, device):
    need_backend(backend, device)
    B, V = 7, 37
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(B, V, generator=g) * 3).to(device)
    temperature = torch.tensor([1e-4, 100.0, 0.5, 1.0, 0.0, 2.0, 1e-3], device=device)
    top_k = torch.tensor([0, 3, 1, 50, 0, 7, 0], device=device)
    top_p = torch.tensor([1.0, 0.5, 1.0, 0.3, 1.0, 1e-9, 0.95], device=device)
    min_p = torch.tensor([0.0, 0.0, 0.2, 0.0, 0.3, 0.0, 0.5], device=device)
    want = hf_warped_probs(x.cpu(), temperature.cpu(), top_k.cpu(), top_p.cpu(), min_p.cpu()).double()
    for s in range(5):
        xs = x.clone().requires_grad_(True)
        tokens, logprobs = rlhf_fast.sample(xs, temperature=temperature, top_k=top_k, top_p=top_p,
                                            min_p=min_p, seed=100 + s, return_logprobs=True, backend=backend)
        assert bool((want[torch.arange(B), tokens.cpu()] > 0).all())
        greedy = temperature.cpu() == 0
        expect_lp = torch.where(greedy, 0.0, want[torch.arange(B), tokens.cpu()].log())
        torch.testing.assert_close(logprobs.cpu().double(), expect_lp, atol=1e-5, rtol=0)
        # The backward reveals the whole processed distribution: d logp / d x = (onehot - p) / T.
        (grad,) = torch.autograd.grad(logprobs.sum(), xs)
        onehot = F.one_hot(tokens.cpu(), V).double()
        safe_t = torch.where(greedy, 1.0, temperature.cpu().double())[:, None]
        expect_grad = torch.where(greedy[:, None], 0.0, (onehot - want) / safe_t)
        torch.testing.assert_close(grad.cpu().double(), expect_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", SAMPLE_BACKENDS)
def test_sample_top_p_boundary_ties(backend, device):
    """Two tied tokens at the top-p boundary. The cut between them: the lower index goes, the higher
    stays (as TopPLogitsWarper with a stable sort). The cut after both: both go."""
    need_backend(backend, device)
    V, n = 23, 4000
    g = torch.Generator().manual_seed(4)
    x = torch.randn(V, generator=g)
    order = x.argsort()
    x[order[10]] = x[order[11]]  # duplicate value in the middle of the ascending order
    low, high = sorted(order[10:12].tolist())
    cum = x.sort().values.softmax(-1).cumsum(-1)
    straddle = 1 - float(cum[10] + cum[11]) / 2  # cut between the two tied tokens
    outside = 1 - float(cum[11] + cum[12]) / 2   # cut after both: both removed
    for top_p, kept in [(straddle, {high}), (outside, set())]:
        want = hf_warped_probs(x[None], 1.0, 0, top_p, 0.0)[0].double()
        assert {i for i in (low, high) if want[i] > 0} == kept
        tokens, logprobs = draw_many(x.to(device), n, backend, top_p=top_p, seed=5)
        tokens, logprobs = tokens.cpu(), logprobs.cpu()
        assert bool((want[tokens] > 0).all())
        torch.testing.assert_close(logprobs.double(), want.log()[tokens], atol=1e-5, rtol=0)
        assert set(tokens.tolist()) == set((want > 0).nonzero().flatten().tolist())


@pytest.mark.parametrize("backend", SAMPLE_BACKENDS)
def test_sample_greedy_is_argmax(backend, device):
    need_backend(backend, device)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(17, 301, generator=g)
    x[3, 5] = x[3, 200] = x[3].max() + 1  # tie: argmax is the lowest index
    x = x.to(device)
    for kw in (dict(), dict(top_k=3, top_p=0.5, min_p=0.2)):
        tokens, logprobs = rlhf_fast.sample(x, temperature=0.0, seed=1, return_logprobs=True,
                                            backend=backend, **kw)
        assert torch.equal(tokens.cpu(), x.cpu().argmax(-1))
        assert int(tokens[3]) == 5
        assert bool((logprobs == 0).all())


@pytest.mark.parametrize("backend", SAMPLE_BACKENDS)
def test_sample_edge_cases(backend, device):
    need_backend(backend, device)
    g = torch.Generator().manual_seed(7)
    # V = 1: the only token, logprob 0, whatever the filters
    one = torch.randn(3, 1, generator=g).to(device)
    tokens, logprobs = rlhf_fast.sample(one, top_k=5, top_p=0.1, min_p=0.5, seed=0, return_logprobs=True,
                                        backend=backend)
    assert tokens.tolist() == [0, 0, 0] and logprobs.abs().max().item() <= 1e-6
    x = torch.randn(1, 31, generator=g).to(device)
    for kw in (dict(top_k=100), dict(top_k=1), dict(top_p=1e-7), dict(top_k=31, top_p=1.0, min_p=0.0)):
        want = hf_warped_probs(x.cpu(), 1.0, kw.get("top_k", 0), kw.get("top_p", 1.0), kw.get("min_p", 0.0))
        for s in range(20):
            tokens, logprobs = rlhf_fast.sample(x, seed=s, return_logprobs=True, backend=backend, **kw)
            p = want[0, int(tokens)].double()
            assert p > 0, kw
            assert abs(float(logprobs) - math.log(p)) <= 1e-5, kw


@pytest.mark.parametrize("backend", SAMPLE_BACKENDS)
def test_sample_from_probs_vs_warpers(backend, device):
    need_backend(backend, device)
    V, n = 19, 5000
    g = torch.Generator().manual_seed(8)
    probs = torch.rand(V, generator=g) + 0.01  # unnormalized, as allowed
    want = hf_warped_probs(probs.log()[None], 0.8, 7, 0.9, 0.05)[0].double()
    tokens, logprobs = rlhf_fast.sample_from_probs(probs[None].expand(n, -1).contiguous().to(device),
                                                   temperature=0.8, top_k=7, top_p=0.9, min_p=0.05, seed=9,
                                                   return_logprobs=True, backend=backend)
    tokens = tokens.cpu()
    assert bool((want[tokens] > 0).all())
    torch.testing.assert_close(logprobs.cpu().double(), want.log()[tokens], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", SAMPLE_BACKENDS)
def test_sample_top_p_straddling_tie_matches_warpers_exactly(backend, device):
    need_backend(backend, device)
    V, n = 23, 3000
    g = torch.Generator().manual_seed(4)
    x = torch.randn(V, generator=g)
    order = x.argsort()
    x[order[10]] = x[order[11]]
    cum = x.sort().values.softmax(-1).cumsum(-1)
    top_p = 1 - float(cum[10] + cum[11]) / 2
    want = hf_warped_probs(x[None], 1.0, 0, top_p, 0.0)[0].double()
    tokens, logprobs = draw_many(x.to(device), n, backend, top_p=top_p, seed=5)
    _check_draws(x, want, tokens, logprobs, n, ("straddling tie", top_p))


def _bf16_row_with_cut_tie(seed, V, top_k, top_p):
    """bf16-rounded logits (V,) whose top-k + top-p cut (stable-sort warpers) falls inside a tie; the
    first such row from `seed` (about a third of rows qualify at V=50257, top_k=50, top_p=0.9)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros((1, 1), dtype=torch.long)
    while True:
        x = (torch.randn(1, V, generator=g) * 2.5).bfloat16().float()
        k = TopKLogitsWarper(top_k)(ids, x)
        with stable_torch_sort():
            kept = TopPLogitsWarper(top_p)(ids, k) > float("-inf")
        v = x[kept].min()
        if bool(((k == v) & ~kept).any()):
            return x[0]


@pytest.mark.parametrize("backend", SAMPLE_BACKENDS)
def test_sample_bf16_vocab_top_k_top_p_ties_vs_warpers(backend, device):
    """GPT-2-sized bf16 logits, top_k=50, top_p=0.9, rows where the top-p cut splits a tie: every
    draw lies in the warpers' support (stable sort: lowest tied indices removed), each kept token with
    p > 8 / n is drawn, logprobs match; the stock warpers (unstable CPU sort) keep as many tied tokens,
    so the kept logits agree as a multiset."""
    need_backend(backend, device)
    V, n, top_k, top_p = 50257, 300, 50, 0.9
    for seed in (0, 1, 2):
        x = _bf16_row_with_cut_tie(seed, V, top_k, top_p)
        want = hf_warped_probs(x[None], 1.0, top_k, top_p, 0.0)[0].double()
        stock = hf_warped_probs(x[None], 1.0, top_k, top_p, 0.0, stable=False)[0].double()
        # as many tied tokens kept, so the same multiset of kept logits (exact; the probabilities themselves
        # differ in the last bit with the summation order, which the tied tokens' places and the CPU's
        # vector width decide)
        assert int((want > 0).sum()) == int((stock > 0).sum()), f"kept sets differ in size (seed {seed})"
        torch.testing.assert_close(x[want > 0].sort().values, x[stock > 0].sort().values, atol=0, rtol=0)
        tokens, logprobs = draw_many(x.bfloat16().to(device), n, backend, top_k=top_k, top_p=top_p, seed=seed)
        tokens, logprobs = tokens.cpu(), logprobs.cpu()
        assert bool((want[tokens] > 0).all()), f"drew a token the warpers removed (seed {seed})"
        torch.testing.assert_close(logprobs.double(), want.log()[tokens], atol=1e-5, rtol=0)
        counts = torch.bincount(tokens, minlength=V)
        assert bool((counts[want > 8 / n] > 0).all()), f"a likely kept token was never drawn (seed {seed})"
