"""sample(..., return_cutoffs=True): the (B, 2) cutoffs describe exactly the kept set of the processed
distribution, on every backend, with t in the middle of the kept set's gap.

The oracle is the reference's `processed_log_probs` (transformers' warpers with a stable top-p sort,
checked against transformers itself in test_sample.py): its finite entries are the kept set. Half of
each batch is rounded to multiples of 1/4, so values tie all over the row and the top-k and top-p cuts
often fall inside a tie (each test asserts it did, so the tie rule is exercised, not assumed).
Backend "cuda" is the C++ port on CPU tensors and the CUDA kernel under --device=cuda
(benchmarks/gpu_check.sh), where test_cuda_kernel_cutoffs_equal_the_cpu_port also runs.
"""
import pytest
import torch

import rlhf_fast
from rlhf_fast.reference import sample as ref
from conftest import need_backend

BACKENDS = ["reference", "cuda"]
FILTERS = {
    "none": dict(),
    "top_k": dict(top_k=20),
    "top_p": dict(top_p=0.9),
    "min_p": dict(min_p=0.05),
    "all": dict(top_k=20, top_p=0.9, min_p=0.05),
}


def kept_by_cutoffs(x: torch.Tensor, cutoffs: torch.Tensor) -> torch.Tensor:
    """(B, V) bool: x > t or (x == t and v >= i), compared in float32 as CUTOFFS.md states."""
    t, i = cutoffs[:, 0].float()[:, None], cutoffs[:, 1][:, None]
    v = torch.arange(x.shape[1], device=x.device, dtype=torch.float64)[None]
    return (x > t) | ((x == t) & (v >= i))


def tied_logits(rows: int, V: int, dtype: torch.dtype, device, seed: int) -> torch.Tensor:
    """(rows, V) logits in [-8, 8]: the first half multiples of 1/4 (many ties), the rest continuous."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, V, generator=g) * 2.5).clamp(-8, 8)
    x[: rows // 2] = (x[: rows // 2] * 4).round() / 4
    return x.to(dtype).to(device)


def processed(logits: torch.Tensor, temperature: float, from_probs: bool = False, **filters) -> torch.Tensor:
    args = ref.normalize_args(logits, temperature, filters.get("top_k", 0), filters.get("top_p", 1.0),
                              filters.get("min_p", 0.0), 0, 0)
    return ref.processed_log_probs(logits, *args[:4], from_probs=from_probs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filters", list(FILTERS))
@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 17, 1000])
def test_cutoffs_describe_the_kept_set(backend, filters, temperature, dtype, V, device):
    need_backend(backend, device)
    kwargs = FILTERS[filters]
    logits = tied_logits(48, V, dtype, device, seed=V)
    tokens, logprobs, cutoffs = rlhf_fast.sample(logits, temperature=temperature, seed=5, return_logprobs=True,
                                                 return_cutoffs=True, backend=backend, **kwargs)
    assert cutoffs.shape == (48, 2) and cutoffs.dtype == torch.float64 and cutoffs.device == logits.device
    x = logits.float() / temperature
    kept = kept_by_cutoffs(x, cutoffs)
    want = torch.isfinite(processed(logits, temperature, **kwargs))
    assert torch.equal(kept, want)
    # the sampler's logprob is log_softmax over the kept set at the drawn token
    over_kept = torch.log_softmax(x.masked_fill(~kept, float("-inf")), -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(over_kept, logprobs, atol=1e-5, rtol=0)
    if not kwargs:
        assert torch.equal(cutoffs.cpu(), torch.tensor([[float("-inf"), 0.0]], dtype=torch.float64).expand(48, 2))
    # t in the gap: the float32 midpoint of the highest removed and the lowest kept x, unless a tie is split
    hi = x.masked_fill(want, float("-inf")).amax(-1)
    lo = x.masked_fill(~want, float("inf")).amin(-1)
    mid = ((hi.double() + lo.double()) / 2).float()
    split = hi == lo
    expected_t = torch.where(split | (mid <= hi), lo, mid).masked_fill(hi == float("-inf"), float("-inf"))
    assert torch.equal(cutoffs[:, 0].float(), expected_t)
    assert bool((cutoffs[~split, 1] == 0).all())
    if V == 1000 and "top_p" in kwargs:  # a top-p cut split a tie in some row: the index rule was used
        assert bool((cutoffs[:, 1] > 0).any())
    if V == 1000 and filters == "top_k":  # some k-th value is tied: top-k kept more than k tokens
        assert bool((kept.sum(-1) > 20).any())


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_set_survives_recomputation_noise(backend, device):
    """What t in the gap buys: logits recomputed with an error below half the gap (a training forward
    instead of the decode step) still give the kept set the sampler used. Continuous logits: no tie."""
    need_backend(backend, device)
    logits = torch.randn(64, 500, device=device) * 3
    kwargs = FILTERS["all"]
    _, cutoffs = rlhf_fast.sample(logits, temperature=0.7, seed=1, return_cutoffs=True, backend=backend, **kwargs)
    x = logits / 0.7
    kept = kept_by_cutoffs(x, cutoffs)
    gap = x.masked_fill(~kept, float("inf")).amin(-1) - x.masked_fill(kept, float("-inf")).amax(-1)
    assert bool((gap > 0).all())
    noise = (torch.rand_like(x) * 2 - 1) * (0.4 * gap[:, None])
    assert torch.equal(kept_by_cutoffs(x + noise, cutoffs), kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extension_cutoffs_equal_the_reference(dtype, device):
    """Per-row parameters of every kind in one batch, greedy and unfiltered rows among them, the
    CUDA kernel's shared-memory (k <= 2048) and streaming (k = 3000) paths: identical cutoffs."""
    need_backend("cuda", device)
    B, V = 64, 4099
    logits = tied_logits(B, V, dtype, device, seed=1)
    g = torch.Generator().manual_seed(2)
    k = torch.randint(0, 40, (B,), generator=g)
    k[1::5] = 3000
    p = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.1
    p[2::6] = 1.0
    m = torch.rand(B, generator=g) * 0.2
    m[3::4] = 0.0
    t = torch.rand(B, generator=g) + 0.3
    t[::7] = 0.0
    k[5], p[5], m[5] = 0, 1.0, 0.0  # no filter
    kwargs = dict(temperature=t.to(device), top_k=k.to(device), top_p=p.to(device), min_p=m.to(device), seed=9,
                  offset=3, return_logprobs=True, return_cutoffs=True)
    ours = rlhf_fast.sample(logits, backend="cuda", **kwargs)
    want = rlhf_fast.sample(logits, backend="reference", **kwargs)
    assert torch.equal(ours[0], want[0])
    assert torch.equal(ours[2], want[2])
    assert ours[2][5, 0] == float("-inf") and ours[2][5, 1] == 0
    greedy = t == 0
    x_max, argmax = logits.float().max(-1)
    assert torch.equal(ours[2][greedy.to(device)], torch.stack((x_max.double(), argmax.double()), -1)[greedy])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_of_zero_probability_count_as_kept_when_no_filter_removes_them(backend, device):
    """Logits spread over 300: exp underflows for the lowest, but top_p = 1 and min_p = 0 remove
    nothing, so those tokens are kept (probability 0): top-k's cut alone sets the cutoff."""
    need_backend(backend, device)
    logits = torch.linspace(-300, 0, 41, device=device)[None].repeat(3, 1)
    _, cutoffs = rlhf_fast.sample(logits, top_k=torch.tensor([0, 30, 41], device=device), seed=0,
                                  return_cutoffs=True, backend=backend)
    highest_removed, lowest_kept = float(logits[0, 10]), float(logits[0, 11])  # top-k 30 removes 0..10
    mid = (highest_removed + lowest_kept) / 2
    assert cutoffs.tolist() == [[float("-inf"), 0.0], [mid, 0.0], [float("-inf"), 0.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_and_greedy_rows(backend, device):
    need_backend(backend, device)
    logits = torch.randn(4, 33, device=device)
    logits[1, 3] = float("nan")
    logits[2] = float("-inf")
    t = torch.tensor([0.0, 0.8, 0.8, 0.8], device=device)
    tokens, cutoffs = rlhf_fast.sample(logits, temperature=t, top_k=5, top_p=0.9, seed=1, return_cutoffs=True,
                                       check_nan=False, backend=backend)
    assert tokens.tolist()[:3] == [int(logits[0].argmax()), -1, -1]
    assert cutoffs[0].tolist() == [float(logits[0].max()), float(logits[0].argmax())]
    assert torch.isnan(cutoffs[1:3, 0]).all() and (cutoffs[1:3, 1] == 0).all()
    assert torch.isfinite(cutoffs[3]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_from_probs_cutoffs(backend, device):
    """Cutoffs of sample_from_probs are on x = log(probs) / T; zero probabilities are never kept."""
    need_backend(backend, device)
    probs = torch.softmax(tied_logits(24, 300, torch.float32, device, seed=4), -1)
    probs[:, ::7] = 0.0
    kwargs = FILTERS["all"]
    tokens, logprobs, cutoffs = rlhf_fast.sample_from_probs(probs, temperature=0.7, seed=3, return_logprobs=True,
                                                            return_cutoffs=True, backend=backend, **kwargs)
    want = rlhf_fast.sample_from_probs(probs, temperature=0.7, seed=3, return_cutoffs=True, backend="reference",
                                       **kwargs)[1]
    # the extension takes its own float32 log: t may differ from torch.log's by an ulp
    torch.testing.assert_close(cutoffs, want, atol=0, rtol=2.0 ** -22)
    x = torch.log(probs) / 0.7
    kept = kept_by_cutoffs(x, want)
    assert torch.equal(kept, torch.isfinite(processed(probs, 0.7, from_probs=True, **kwargs)))
    assert not bool(kept[:, ::7].any())


def test_return_combinations_and_bad_flag(device):
    logits = torch.randn(3, 11, device=device)
    kwargs = dict(top_k=4, seed=2, backend="reference")
    tokens = rlhf_fast.sample(logits, **kwargs)
    tokens_c, cutoffs = rlhf_fast.sample(logits, return_cutoffs=True, **kwargs)
    tokens_lc, logprobs, cutoffs_lc = rlhf_fast.sample(logits, return_logprobs=True, return_cutoffs=True, **kwargs)
    assert torch.equal(tokens, tokens_c) and torch.equal(tokens, tokens_lc) and torch.equal(cutoffs, cutoffs_lc)
    assert logprobs.shape == (3,)
    empty = rlhf_fast.sample(logits[:0], return_cutoffs=True, **kwargs)[1]
    assert empty.shape == (0, 2) and empty.dtype == torch.float64
    with pytest.raises(ValueError, match="return_cutoffs must be a bool"):
        rlhf_fast.sample(logits, return_cutoffs="yes", **kwargs)


def test_cuda_kernel_cutoffs_equal_the_cpu_port(device):
    """On a GPU (gpu_check.sh): the CUDA kernel's cutoffs equal its C++ port's, for long rows with
    ties scattered over many tiles, both top-k paths, and every filter."""
    if device.type != "cuda":
        pytest.skip("needs --device=cuda")
    need_backend("cuda", device)
    B, V = 96, 50_001
    logits = tied_logits(B, V, torch.bfloat16, "cpu", seed=7)
    k = torch.tensor([0, 20, 700, 3000] * (B // 4))
    p = torch.tensor([0.9, 1.0, 0.5] * (B // 3), dtype=torch.float64)
    m = torch.tensor([0.0, 0.05] * (B // 2))
    t = torch.tensor([0.7, 1.3] * (B // 2))
    cpu = rlhf_fast.sample(logits, temperature=t, top_k=k, top_p=p, min_p=m, seed=4, return_logprobs=True,
                           return_cutoffs=True, backend="cuda")
    gpu = rlhf_fast.sample(logits.to(device), temperature=t.to(device), top_k=k.to(device), top_p=p.to(device),
                           min_p=m.to(device), seed=4, return_logprobs=True, return_cutoffs=True, backend="cuda")
    assert torch.equal(gpu[0].cpu(), cpu[0])
    assert torch.equal(gpu[2].cpu(), cpu[2])
    assert bool((cpu[2][:, 1] > 0).any())
    kept = kept_by_cutoffs(logits.float() / t[:, None], cpu[2])
    assert torch.equal(kept, torch.isfinite(ref.processed_log_probs(logits, t, k, p, m, from_probs=False)))
