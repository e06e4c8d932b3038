"""sample / sample_from_probs: distributions against transformers' warpers, reproducibility, logprobs,
agreement between backends, bad input.

The oracle of every distribution test is transformers itself (TemperatureLogitsWarper, TopKLogitsWarper,
TopPLogitsWarper, MinPLogitsWarper with min_tokens_to_keep=1, in that order) in float64-free float32,
as transformers runs them; the logits are random, so no tie sits on a filter boundary, except in the
tie tests, whose expectations are stated by hand.
"""
import math
from unittest import mock

import pytest
import torch
from scipy import stats

import rlhf_fast
from rlhf_fast import BackendUnavailable
from rlhf_fast.reference import sample as ref
from conftest import need_backend

BACKENDS = ["reference", "cuda"]
DRAWS = 40_000


def warped_probs(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """transformers' processed distribution for one row of logits (V,), as float64 probabilities.

    TopPLogitsWarper's torch.sort is made stable: the default CPU sort is not (beyond 16 tokens), so
    which tokens of a tie cut by top-p it removes would be arbitrary (see test_oracles_sample.stable_torch_sort).
    """
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                         TopKLogitsWarper, TopPLogitsWarper)
    scores = logits.float().cpu()[None]
    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p > 0.0:
        warpers.append(MinPLogitsWarper(min_p))
    sort = torch.sort
    with mock.patch.object(torch, "sort", lambda *args, **kw: sort(*args, **{**kw, "stable": True})):
        for warper in warpers:
            scores = warper(None, scores)
    return torch.softmax(scores[0].double(), -1)


def assert_matches(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Zero draws of filtered tokens, and a chi-square test (p > 1e-4) on the kept ones; kept tokens
    expected fewer than 5 times are pooled so the chi-square approximation holds."""
    counts, probs = counts.double().cpu(), probs.double().cpu()
    assert counts[probs == 0].sum() == 0, "a filtered token was drawn"
    expected = probs * counts.sum()
    small = (expected < 5) & (probs > 0)
    obs = torch.cat([counts[~small & (probs > 0)], counts[small].sum()[None]])
    exp = torch.cat([expected[~small & (probs > 0)], expected[small].sum()[None]])
    keep = exp > 0
    if keep.sum() < 2:
        assert obs[keep].sum() == counts.sum()
        return
    pvalue = stats.chisquare(obs[keep].numpy(), exp[keep].numpy()).pvalue
    assert pvalue > 1e-4, f"chi-square p = {pvalue:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_distribution_per_row_parameters_in_one_batch(backend, device):
    """Four settings interleaved row by row, as per-row tensors, in one call; bf16 logits."""
    need_backend(backend, device)
    logits = (torch.randn(20, device=device) * 1.5).bfloat16()
    settings = [dict(temperature=0.6, top_k=0, top_p=1.0, min_p=0.0),
                dict(temperature=1.0, top_k=4, top_p=1.0, min_p=0.0),
                dict(temperature=1.2, top_k=0, top_p=0.7, min_p=0.0),
                dict(temperature=0.8, top_k=10, top_p=0.9, min_p=0.2)]
    per_row = {name: torch.tensor([s[name] for s in settings], device=device).repeat(DRAWS // 4)
               for name in settings[0]}
    tokens = rlhf_fast.sample(logits.expand(DRAWS, 20), seed=5, offset=2, backend=backend, **per_row)
    for i, s in enumerate(settings):
        assert_matches(torch.bincount(tokens[i::4], minlength=20), warped_probs(logits, **s))


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_and_offset_reproducible(backend, device):
    need_backend(backend, device)
    logits = torch.randn(300, 1000, device=device)
    base = rlhf_fast.sample(logits, seed=123, offset=4, backend=backend)
    same = rlhf_fast.sample(logits, seed=torch.tensor(123, device=device), offset=torch.tensor([4], device=device),
                            backend=backend)
    other_seed = rlhf_fast.sample(logits, seed=124, offset=4, backend=backend)
    other_offset = rlhf_fast.sample(logits, seed=123, offset=5, backend=backend)
    assert torch.equal(base, same)
    assert (base != other_seed).float().mean() > 0.9
    assert (base != other_offset).float().mean() > 0.9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("params", [dict(temperature=0.8), dict(top_k=7), dict(top_p=0.75), dict(min_p=0.05),
                                    dict(temperature=1.3, top_k=50, top_p=0.9, min_p=0.02)])
def test_logprobs_are_processed_distribution(backend, params, device):
    need_backend(backend, device)
    logits = torch.randn(9, 341, device=device) * 2
    tokens, logprobs = rlhf_fast.sample(logits, seed=3, return_logprobs=True, backend=backend, **params)
    for row in range(9):
        expected = warped_probs(logits[row], **params).log()[tokens[row]]
        assert abs(logprobs[row].item() - expected.item()) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 17, 300, 4099])
def test_extension_draws_the_reference_tokens(dtype, V, device):
    """Same Philox uniforms, same filters: the csrc kernels return the reference's tokens."""
    need_backend("cuda", device)
    logits = (torch.randn(64, V, device=device) * 3).to(dtype)
    k = torch.randint(0, 12, (64,), device=device)
    k[1::5] = 3000  # more than the CUDA kernel gathers into shared memory (2048): the streaming path
    p = torch.rand(64, device=device) * 0.9 + 0.1
    m = torch.rand(64, device=device) * 0.2
    t = torch.rand(64, device=device) + 0.3
    t[::7] = 0.0
    kwargs = dict(temperature=t, top_k=k, top_p=p, min_p=m, seed=99, offset=7, return_logprobs=True)
    ours = rlhf_fast.sample(logits, backend="cuda", **kwargs)
    want = rlhf_fast.sample(logits, backend="reference", **kwargs)
    assert torch.equal(ours[0], want[0])
    torch.testing.assert_close(ours[1], want[1], atol=1e-5, rtol=0)
    if device.type == "cuda":  # the CUDA kernel and its C++ port draw the same tokens
        cpu = rlhf_fast.sample(logits.cpu(), backend="cuda", **{**kwargs, "temperature": t.cpu(), "top_k": k.cpu(),
                                                                 "top_p": p.cpu(), "min_p": m.cpu()})
        assert torch.equal(ours[0].cpu(), cpu[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_the_top_k_and_top_p_boundary(backend, device):
    """top-k keeps a boundary tie whole; top-p removes the lowest-index tokens of a tie its cut splits.

    Probabilities of [3, 1, 2, 2, 0, 2]: 0.437, 0.059, 3 x 0.161, 0.022; ascending cumulative 0.022,
    0.081, 0.242, 0.402, 0.563, 1 over tokens 4, 1, 2, 3, 5, 0 (ties in index order).
    """
    need_backend(backend, device)
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0, 2.0]], device=device).expand(4000, 6)
    cases = [(dict(top_k=2), {0, 2, 3, 5}),
             (dict(top_p=0.9), {0, 2, 3, 5}),   # cut 0.1 below the tie: kept whole
             (dict(top_p=0.6), {0, 3, 5}),      # cut 0.4: the tie's first token goes
             (dict(top_p=0.45), {0, 5}),        # cut 0.55: its first two go
             (dict(top_p=0.1), {0})]            # cut 0.9: the whole tie goes, token 0 stays
    for kwargs, kept in cases:
        want = warped_probs(logits[0], **kwargs)
        assert set((want > 0).nonzero().flatten().tolist()) == kept, kwargs
        tokens, logprobs = rlhf_fast.sample(logits, seed=1, return_logprobs=True, backend=backend, **kwargs)
        assert set(tokens.tolist()) == kept, kwargs
        torch.testing.assert_close(logprobs.double().cpu(), want.log()[tokens.cpu()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [0, 700, 2500])
def test_top_p_cut_inside_a_large_scattered_tie(backend, top_k, device):
    """600 tokens tied at the top value, scattered over V = 9001 (several CUDA tiles), the top-p cut
    after 300.5 of them: exactly the 300 highest-index tied tokens stay, each with p = 1/300. top_k 700
    takes the CUDA kernel's shared-memory path, 0 and 2500 its streaming path."""
    need_backend(backend, device)
    V, ties, kept, n = 9001, 600, 300, 1000
    g = torch.Generator().manual_seed(top_k)
    x = torch.randn(V, generator=g) * 0.5 - 6.0
    tied = torch.randperm(V, generator=g)[:ties].sort().values
    x[tied] = 0.0
    in_k = x >= x.sort(descending=True).values[top_k - 1] if top_k else torch.ones(V, dtype=torch.bool)
    mass = torch.where(in_k, x.double().exp(), 0.0)
    below = float(mass.sum()) - ties
    top_p = 1 - (below + (ties - kept + 0.5)) / float(mass.sum())
    tokens, logprobs = rlhf_fast.sample(x[None].expand(n, V).to(device), top_k=top_k, top_p=top_p, seed=top_k,
                                        return_logprobs=True, backend=backend)
    drawn = set(tokens.tolist())
    assert drawn <= set(tied[ties - kept:].tolist()), "drew a token outside the kept half of the tie"
    assert len(drawn) > kept * 0.9  # each kept token is drawn with chance 1 - e^-3.3 = 0.96
    torch.testing.assert_close(logprobs.double().cpu(), torch.full((n,), -math.log(kept), dtype=torch.float64),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [7, 10, 20, 33, 100, 1000])
def test_uniform_row_top_p_cut_rounds_as_transformers(backend, V, device):
    """A uniform row puts the top-p cut exactly on a cumulative sum for round top_p (0.3 of 10 tokens):
    transformers' float32 rounding then decides, and we keep as many tokens as it does."""
    need_backend(backend, device)
    top_p = torch.tensor([i / 100 for i in range(1, 100)] + [1 / 3, 2 / 3, 0.125, 0.999], dtype=torch.float64)
    logits = torch.zeros(len(top_p), V)
    kept = torch.tensor([int((warped_probs(logits[0], top_p=float(p)) > 0).sum()) for p in top_p])
    _, logprobs = rlhf_fast.sample(logits.to(device), top_p=top_p.to(device), seed=2, return_logprobs=True,
                                   backend=backend)
    torch.testing.assert_close(logprobs.double().cpu(), -kept.double().log(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_from_probs_is_sample_of_log_probs(backend, device):
    need_backend(backend, device)
    probs = torch.softmax(torch.randn(41, 257, device=device), -1)
    probs[:, ::5] = 0.0
    kwargs = dict(temperature=0.9, top_k=30, top_p=0.9, seed=8, return_logprobs=True, backend=backend)
    a = rlhf_fast.sample_from_probs(probs, **kwargs)
    b = rlhf_fast.sample(torch.log(probs), **kwargs)
    assert torch.equal(a[0], b[0]) and (probs.gather(1, a[0][:, None]) > 0).all()
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprob_gradient_matches_autograd_of_reference(backend, device):
    need_backend(backend, device)
    logits = torch.randn(7, 53, device=device, requires_grad=True)
    t = torch.tensor([0.7, 1.0, 0.0, 1.5, 0.9, 1.1, 0.5], device=device)
    tokens, logprobs = rlhf_fast.sample(logits, temperature=t, top_k=10, top_p=0.9, seed=2, return_logprobs=True,
                                        backend=backend)
    weights = torch.randn(7, device=device)
    (grad,) = torch.autograd.grad((logprobs * weights).sum(), logits)
    x = logits.detach().clone().requires_grad_()
    safe_t = torch.where(t == 0, 1.0, t)
    scores = ref.warp(x / safe_t[:, None], torch.full((7,), 10, device=device),
                      torch.full((7,), 0.9, dtype=torch.float64, device=device), torch.zeros(7, device=device))
    want_lp = torch.log_softmax(scores, -1).gather(1, tokens[:, None])[:, 0]
    (want,) = torch.autograd.grad((want_lp * weights * (t > 0)).sum(), x)
    torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-5)


def test_compiles_fullgraph_without_break(device):
    backend = "cuda" if rlhf_fast._backend.cuda_ext_reason(device) is None else "reference"
    logits = torch.randn(5, 77, device=device)

    def step(x, offset):
        return rlhf_fast.sample(x, temperature=0.8, top_p=0.9, seed=4, offset=offset, backend=backend)

    # aot_eager traces through dynamo (fullgraph: any graph break raises) and the fake kernel, without
    # paying for Inductor's C++ codegen on CPU.
    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend="aot_eager")
    off = torch.tensor([3], device=device)
    assert torch.equal(compiled(logits, off), step(logits, off))


def test_no_triton_backend(device):
    with pytest.raises(BackendUnavailable, match="no 'triton' backend"):
        rlhf_fast.sample(torch.randn(2, 5, device=device), backend="triton")


BAD_LOGITS = {  # name: (row, column, value, expected message)
    "nan": (1, 3, float("nan"), "logits row 1 contains NaN"),
    "inf": (2, 0, float("inf"), r"logits row 2 contains \+inf"),
    "all -inf": (3, None, float("-inf"), "logits row 3 is all -inf"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BAD_LOGITS))
def test_bad_logits_raise_or_mark_the_row(backend, name, device):
    need_backend(backend, device)
    row, col, value, match = BAD_LOGITS[name]
    logits = torch.randn(4, 9, device=device)
    if col is None:
        logits[row] = value
    else:
        logits[row, col] = value
    with pytest.raises(ValueError, match=match):
        rlhf_fast.sample(logits, backend=backend)
    tokens, logprobs = rlhf_fast.sample(logits, backend=backend, check_nan=False, return_logprobs=True)
    assert tokens[row].item() == -1 and torch.isnan(logprobs[row])
    assert (tokens[torch.arange(4, device=device) != row] >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(min_p=1.0), "min_p"), (dict(min_p=-0.1), "min_p"),
    (dict(temperature=torch.tensor([1.0, -1.0, 1.0])), "temperature"),
    (dict(top_k=torch.tensor([0, -3, 1])), "top_k"),
    (dict(top_p=torch.tensor([1.0, 0.5, 0.0])), "top_p"),
    (dict(min_p=torch.tensor([0.0, 1.0, 0.2])), "min_p"),
    (dict(top_k=torch.tensor([1.0, 2.0, 3.0])), "top_k"),
    (dict(top_p=torch.tensor([1, 1, 1])), "top_p"),
    (dict(temperature=torch.ones(4)), "temperature"),
    (dict(seed=-1), "seed"), (dict(seed=torch.tensor([1.0])), "seed"), (dict(offset=1.5), "offset"),
])
def test_bad_parameters_raise(backend, kwargs, match, device):
    need_backend(backend, device)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        rlhf_fast.sample(torch.randn(3, 11, device=device), backend=backend, **kwargs)


@pytest.mark.parametrize("bad,match", [
    (torch.randn(3, 4, 5), "logits must have 2 dimensions"),
    (torch.randn(3, 0), "non-empty vocabulary"),
    (torch.randint(0, 5, (3, 4)), "logits must have dtype"),
    (torch.randn(3, 4, dtype=torch.float64), "logits must have dtype"),
    ([[0.1, 0.2]], "logits must be a torch.Tensor"),
])
def test_bad_logits_tensor_raises(bad, match, device):
    bad = bad.to(device) if isinstance(bad, torch.Tensor) else bad
    with pytest.raises(ValueError, match=match):
        rlhf_fast.sample(bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("corrupt,match", [
    (lambda p: p.index_fill_(1, torch.tensor(2), -0.1), "probs must be finite and >= 0"),
    (lambda p: p.index_fill_(0, torch.tensor(1), 0.0), "all zeros"),
    (lambda p: p.index_fill_(1, torch.tensor(0), float("nan")), "probs must be finite"),
])
def test_bad_probs_raise(backend, corrupt, match, device):
    need_backend(backend, device)
    probs = corrupt(torch.softmax(torch.randn(3, 8), -1)).to(device)
    with pytest.raises(ValueError, match=match):
        rlhf_fast.sample_from_probs(probs, backend=backend)


def test_parameter_on_other_device_raises(device):
    if device.type != "cuda":
        pytest.skip("needs two devices")
    with pytest.raises(ValueError, match="top_p is on cpu"):
        rlhf_fast.sample(torch.randn(2, 5, device=device), top_p=torch.tensor([0.5, 0.5]))


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10 (the C++ / CUDA port matches the reference tokens)."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        got = ref.philox4x32_10(tuple(torch.tensor(c) for c in ctr), tuple(torch.tensor(k) for k in key))
        assert [int(w) for w in got] == list(want)


def test_cuda_graph_replay_with_device_seed_and_offset(device):
    """seed / offset live on the GPU and check_nan=False: the step captures in a CUDA graph with no host
    sync, and each replay after bumping the offset in place draws what an eager call draws."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    need_backend("cuda", device)
    logits = torch.randn(64, 32000, device=device)
    seed, offset = torch.tensor([7], device=device), torch.tensor([0], device=device)

    def step():
        return rlhf_fast.sample(logits, temperature=0.8, top_k=50, top_p=0.9, seed=seed, offset=offset,
                                backend="cuda", check_nan=False)

    step()  # warm-up outside the capture (extension load, allocator)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for position in (3, 4):
        offset.fill_(position)
        graph.replay()
        assert torch.equal(captured, step())


@pytest.mark.parametrize("V", [1, 2, 17, 300, 1001])
def test_reference_warp_is_transformers_warpers(V, device):
    """The reference's processed distribution equals transformers' on random rows and parameters: same
    support, probabilities within float32 rounding (6e-7 of the float64 softmax of the same scores)."""
    gen = torch.Generator().manual_seed(V)
    for _ in range(6):
        logits = (torch.randn(V, generator=gen) * 3).to(device)
        params = dict(temperature=float(torch.rand(1, generator=gen)) + 0.3,
                      top_k=int(torch.randint(0, V + 2, (1,), generator=gen)),
                      top_p=float(torch.rand(1, generator=gen)) * 0.95 + 0.05,
                      min_p=float(torch.rand(1, generator=gen)) * 0.3)
        want = warped_probs(logits, **params)
        args = ref.normalize_args(logits[None], params["temperature"], params["top_k"], params["top_p"],
                                  params["min_p"], 0, 0)
        got = ref.processed_log_probs(logits[None], *args[:4], from_probs=False)[0].exp().double().cpu()
        assert torch.equal(got > 0, want > 0), params
        torch.testing.assert_close(got, want, atol=6e-7, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_from_probs_logprob_gradient(backend, device):
    """d logprob / d probs through log: autograd of the reference's log-softmax of log(q) / T."""
    need_backend(backend, device)
    probs = torch.softmax(torch.randn(5, 31, device=device), -1).requires_grad_()
    tokens, logprobs = rlhf_fast.sample_from_probs(probs, temperature=0.9, top_k=12, seed=6, return_logprobs=True,
                                                   backend=backend)
    (grad,) = torch.autograd.grad(logprobs.sum(), probs)
    q = probs.detach().clone().requires_grad_()
    scores = ref.warp(torch.log(q) / 0.9, torch.full((5,), 12, device=device),
                      torch.ones(5, dtype=torch.float64, device=device), torch.zeros(5, device=device))
    (want,) = torch.autograd.grad(torch.log_softmax(scores, -1).gather(1, tokens[:, None]).sum(), q)
    torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)
