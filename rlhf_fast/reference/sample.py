"""Plain-PyTorch sampling: transformers' warpers, then an inverse-CDF draw from Philox4x32-10 uniforms.

This is the reference path of `rlhf_fast.sample` / `rlhf_fast.sample_from_probs` and the oracle of the
csrc kernels: it draws the same uniform per row as the C++ and CUDA code, so for the same
(seed, offset) all three return the same tokens (they can differ only when the uniform lands within
float32 rounding of a CDF step).

The filters follow transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper and
MinPLogitsWarper (min_tokens_to_keep=1), applied in that order, in float32. Ties: top-k keeps every
token tied with the k-th value; top-p sorts with a stable sort, so when a tie straddles its cut the
lowest-index tied tokens are the ones removed (TopPLogitsWarper's own torch.sort is unstable on CPU
for rows over 16 tokens: it removes as many tied tokens, but which ones is arbitrary).

With want_cutoffs / return_cutoffs it also reports each row's kept set as a cutoff (t, i)
(`warp_with_cutoffs`), the value the C++ and CUDA samplers write in step 6 of sampling_common.h.
"""
from __future__ import annotations

import torch

# dtype of each per-row parameter as the op takes it (a scalar becomes a (B,) tensor of it).
PARAM_DTYPES = {"temperature": torch.float32, "top_k": torch.int64, "top_p": torch.float64, "min_p": torch.float32}

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo32(m: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of m * c for c in [0, 2^32), exact in int64 via 16-bit limbs."""
    mh, ml = m >> 16, m & 0xFFFF
    ch, cl = c >> 16, c & 0xFFFF
    mid = mh * cl + ml * ch                      # < 2^33
    lo_full = ml * cl + ((mid & 0xFFFF) << 16)   # < 2^33
    hi = mh * ch + (mid >> 16) + (lo_full >> 32)
    return hi & _MASK32, lo_full & _MASK32


def philox4x32_10(ctr: tuple[torch.Tensor, ...], key: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    """Random123's Philox4x32-10 on int64 tensors holding 32-bit words: 4 counter words, 2 key words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK32 for c in ctr)
    k0, k1 = (torch.as_tensor(k, dtype=torch.int64) & _MASK32 for k in key)
    for r in range(10):
        if r > 0:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo32(_M0, c0)
        hi1, lo1 = _mulhilo32(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def row_uniforms(seed: torch.Tensor, offset: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows,) float32 uniforms in [0, 1): Philox counter (row, 0, offset_lo, offset_hi), key seed.

    The top 24 bits of the first output word, times 2^-24 (exact in float32); the kernels do the same.
    """
    seed = seed.reshape(()).to(torch.int64)
    offset = offset.reshape(()).to(torch.int64)
    row = torch.arange(rows, device=seed.device, dtype=torch.int64)
    zero = torch.zeros_like(row)
    out = philox4x32_10((row, zero, zero + offset, zero + (offset >> 32)), (seed, seed >> 32))
    return (out[0] >> 8).to(torch.float32) * (2.0 ** -24)


def as_rows(name: str, value, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A scalar or (rows,) tensor parameter as a (rows,) tensor of `dtype` on `device`."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(rows)
        if value.shape != (rows,):
            raise ValueError(f"{name} must be a scalar or a tensor of shape ({rows},), got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the logits are on {device}")
        return value.to(dtype)
    return torch.full((rows,), value, dtype=dtype, device=device)


def invalid_rows(x: torch.Tensor, temperature, top_k, top_p, min_p, from_probs: bool) -> torch.Tensor:
    """(B,) bool: rows whose input or parameters are out of range (the kernels return token -1 there)."""
    if from_probs:
        bad_x = (~torch.isfinite(x) | (x < 0)).any(-1) | (x <= 0).all(-1)
    else:
        bad_x = torch.isnan(x).any(-1) | (x == float("inf")).any(-1) | (x == float("-inf")).all(-1)
    bad_p = ~(temperature >= 0) | (top_k < 0) | ~((top_p > 0) & (top_p <= 1)) | ~((min_p >= 0) & (min_p < 1))
    return bad_x | bad_p


def warp(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Top-k, then top-p, then min-p on tempered float32 scores (B, V); filtered entries become -inf.

    top_k (B,) int64 (0 = off), top_p (B,) float64, min_p (B,) float32, as in transformers' warpers.
    """
    return warp_with_cutoffs(scores, top_k, top_p, min_p, want_cutoffs=False)[0]


def warp_with_cutoffs(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                      want_cutoffs: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`warp`, and with want_cutoffs each row's cutoff (B, 2) float64 (None without).

    A row's cutoff (t, i) says which tokens the filters kept: v is kept <=> s_v > t or (s_v == t and
    v >= i), with s the tempered scores given (float32). Every filter keeps an upper set of the tokens
    ordered by (s, index), so the kept set is one too, and (t, i) is chosen in its gap: with lo the
    lowest kept score and hi the highest removed one, t = float32((hi + lo) / 2) (lo if that rounds
    to hi) and i = 0, so scores recomputed within half the gap of these keep the same set. When the
    top-p cut splits a tie (hi == lo): t = lo and i = the lowest kept index among the tied tokens.
    Nothing removed but -inf scores: (-inf, 0).
    """
    B, V = scores.shape
    neg_inf = float("-inf")
    x = scores
    # TopKLogitsWarper: drop scores below the k-th largest; ties with it stay.
    k = top_k.clamp(1, V)
    kth = torch.sort(scores, dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # no host read of k
    scores = scores.masked_fill((scores < kth) & (top_k > 0)[:, None], neg_inf)
    # TopPLogitsWarper: drop the ascending prefix whose cumulative probability is <= 1 - top_p; the
    # stable sort puts tied tokens in index order, so a tie straddling the cut loses its lowest indices.
    sorted_logits, sorted_indices = torch.sort(scores, descending=False, stable=True)
    # transformers' float32 cumsum as torch's CPU kernel computes it: each prefix sum accumulated in
    # double, then rounded to float32 (the csrc kernels' top_p_remove_bound assumes exactly this). CUDA's
    # float32 cumsum accumulates in float32, so the sum is spelled out to give the same cut on any device.
    cumulative = sorted_logits.softmax(dim=-1).double().cumsum(dim=-1).float()
    # (top_p = 1 is no filter, as in transformers, which then adds no TopPLogitsWarper: without the
    # bound > 0 test, tokens whose float32 probability underflows to 0 would go)
    remove_bound = (1 - top_p).to(torch.float32)[:, None]
    sorted_remove = (cumulative <= remove_bound) & (remove_bound > 0)
    sorted_remove[:, -1] = False
    scores = scores.masked_fill(sorted_remove.scatter(1, sorted_indices, sorted_remove), neg_inf)
    # MinPLogitsWarper: drop p < min_p * p_max, never the top token.
    probs = scores.softmax(dim=-1)
    remove = probs < min_p[:, None] * probs.amax(-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(-1, keepdim=True), False)
    scores = scores.masked_fill(remove, neg_inf)
    if not want_cutoffs:
        return scores, None
    kept = torch.isfinite(scores)
    lo = torch.where(kept, x, float("inf")).amin(-1)
    hi = torch.where(kept, neg_inf, x).amax(-1)
    mid = ((hi.double() + lo.double()) * 0.5).float()
    tie = hi == lo
    t = torch.where(tie | (mid <= hi), lo, mid)
    index = torch.arange(V, device=x.device)
    i = torch.where(tie, torch.where(kept & (x == lo[:, None]), index, V).amin(-1), 0)
    nothing_removed = hi == neg_inf
    t = t.masked_fill(nothing_removed, neg_inf)
    i = i.masked_fill(nothing_removed, 0)
    return scores, torch.stack((t.double(), i.double()), dim=-1)


def draw(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF in vocabulary order: the first token whose cumulative mass exceeds u * total.

    scores (B, V) float32 with -inf for filtered tokens, u (B,) in [0, 1). Masses are exp(s - max)
    summed in float32; when rounding leaves u * total past the last step, the last token with
    positive mass is drawn.
    """
    V = scores.shape[1]
    mass = torch.exp(scores - scores.amax(-1, keepdim=True))
    cdf = mass.cumsum(-1)
    target = u * mass.sum(-1)
    tokens = (cdf <= target[:, None]).sum(-1)
    last_positive = V - 1 - (mass > 0).flip(-1).to(torch.int8).argmax(-1)
    return torch.minimum(tokens, last_positive)


def sample_rows(x: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                min_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor, from_probs: bool,
                want_cutoffs: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The whole op on normalized inputs: (tokens (B,) int64, logprobs (B,) float32, cutoffs).

    x (B, V) logits or probabilities; temperature (B,) float32, top_k (B,) int64, top_p (B,) float64,
    min_p (B,) float32; seed, offset int64 with one element. Invalid rows get token -1, logprob NaN.
    cutoffs: None, or with want_cutoffs (B, 2) float64 as `warp_with_cutoffs` defines them on the
    tempered x; greedy rows (x_max, argmax) of the untempered x, invalid rows (NaN, 0).
    """
    B = x.shape[0]
    bad = invalid_rows(x, temperature, top_k, top_p, min_p, from_probs)
    xf = x.float()
    logits = torch.log(xf) if from_probs else xf
    logits = logits.masked_fill(bad[:, None], 0.0)
    greedy = temperature == 0
    safe_t = torch.where(greedy | bad, torch.ones_like(temperature), temperature)
    safe_k = torch.where(bad, torch.zeros_like(top_k), top_k)
    safe_p = torch.where(bad, torch.ones_like(top_p), top_p)
    safe_min_p = torch.where(bad, torch.zeros_like(min_p), min_p)
    scores, cutoffs = warp_with_cutoffs(logits / safe_t[:, None], safe_k, safe_p, safe_min_p, want_cutoffs)
    tokens = draw(scores, row_uniforms(seed, offset, B))
    logprobs = torch.log_softmax(scores, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    argmax = logits.argmax(-1)
    tokens = torch.where(greedy, argmax, tokens)
    logprobs = torch.where(greedy, torch.zeros_like(logprobs), logprobs)
    tokens = tokens.masked_fill(bad, -1)
    logprobs = logprobs.masked_fill(bad, float("nan"))
    if want_cutoffs:
        point = torch.stack((logits.amax(-1).double(), argmax.double()), dim=-1)
        cutoffs = torch.where(greedy[:, None], point, cutoffs)
        invalid = torch.tensor([float("nan"), 0.0], dtype=torch.float64, device=x.device)
        cutoffs = torch.where(bad[:, None], invalid, cutoffs)
    return tokens, logprobs, cutoffs


def processed_log_probs(x: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                        min_p: torch.Tensor, from_probs: bool) -> torch.Tensor:
    """(B, V) float32 log of the processed distribution (the distribution `sample` draws from).

    Greedy rows (temperature 0) are a point mass on the argmax.
    """
    xf = x.float()
    logits = torch.log(xf) if from_probs else xf
    greedy = temperature == 0
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)
    logp = torch.log_softmax(warp(logits / safe_t[:, None], top_k, top_p, min_p), dim=-1)
    point = torch.full_like(logp, float("-inf")).scatter_(1, logits.argmax(-1, keepdim=True), 0.0)
    return torch.where(greedy[:, None], point, logp)


def normalize_args(x: torch.Tensor, temperature, top_k, top_p, min_p, seed, offset) -> tuple:
    """Scalars or (B,) tensors -> the (B,) tensors `sample_rows` takes; seed None draws one from torch."""
    B, device = x.shape[0], x.device
    if seed is None:
        seed = torch.randint(0, 2 ** 62, (1,), device=device)
    seed = seed.reshape(1).to(torch.int64) if isinstance(seed, torch.Tensor) else torch.tensor([seed], device=device)
    if isinstance(offset, torch.Tensor):
        offset = offset.reshape(1).to(torch.int64)
    else:
        offset = torch.tensor([offset], dtype=torch.int64, device=device)
    params = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return (*(as_rows(name, params[name], B, dtype, device) for name, dtype in PARAM_DTYPES.items()), seed, offset)


def _outputs(tokens, logprobs, cutoffs, return_logprobs: bool, return_cutoffs: bool):
    """tokens, (tokens, logprobs), (tokens, cutoffs) or (tokens, logprobs, cutoffs), as asked."""
    out = (tokens,) + ((logprobs,) if return_logprobs else ()) + ((cutoffs,) if return_cutoffs else ())
    return out if len(out) > 1 else tokens


def sample(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, offset=0,
           return_logprobs: bool = False, return_cutoffs: bool = False):
    """Reference twin of `rlhf_fast.sample` (no input checks; invalid rows give token -1)."""
    out = sample_rows(logits, *normalize_args(logits, temperature, top_k, top_p, min_p, seed, offset),
                      from_probs=False, want_cutoffs=return_cutoffs)
    return _outputs(*out, return_logprobs, return_cutoffs)


def sample_from_probs(probs: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, offset=0,
                      return_logprobs: bool = False, return_cutoffs: bool = False):
    """Reference twin of `rlhf_fast.sample_from_probs` (no input checks; invalid rows give token -1)."""
    out = sample_rows(probs, *normalize_args(probs, temperature, top_k, top_p, min_p, seed, offset),
                      from_probs=True, want_cutoffs=return_cutoffs)
    return _outputs(*out, return_logprobs, return_cutoffs)
