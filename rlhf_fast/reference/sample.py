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
    B, V = scores.shape
    neg_inf = float("-inf")
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
    sorted_remove = cumulative <= (1 - top_p).to(torch.float32)[:, None]
    sorted_remove[:, -1] = False
    scores = scores.masked_fill(sorted_remove.scatter(1, sorted_indices, sorted_remove), neg_inf)
    # MinPLogitsWarper: drop p < min_p * p_max, never the top token.
    probs = scores.softmax(dim=-1)
    remove = probs < min_p[:, None] * probs.amax(-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(-1, keepdim=True), False)
    return scores.masked_fill(remove, neg_inf)


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
                min_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor,
                from_probs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole op on normalized inputs: (tokens (B,) int64, logprobs (B,) float32).

    x (B, V) logits or probabilities; temperature (B,) float32, top_k (B,) int64, top_p (B,) float64,
    min_p (B,) float32; seed, offset int64 with one element. Invalid rows get token -1, logprob NaN.
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
    scores = warp(logits / safe_t[:, None], safe_k, safe_p, safe_min_p)
    tokens = draw(scores, row_uniforms(seed, offset, B))
    logprobs = torch.log_softmax(scores, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    tokens = torch.where(greedy, logits.argmax(-1), tokens)
    logprobs = torch.where(greedy, torch.zeros_like(logprobs), logprobs)
    tokens = tokens.masked_fill(bad, -1)
    logprobs = logprobs.masked_fill(bad, float("nan"))
    return tokens, logprobs


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


def sample(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, offset=0,
           return_logprobs: bool = False):
    """Reference twin of `rlhf_fast.sample` (no input checks; invalid rows give token -1)."""
    tokens, logprobs = sample_rows(logits, *normalize_args(logits, temperature, top_k, top_p, min_p, seed, offset),
                                   from_probs=False)
    return (tokens, logprobs) if return_logprobs else tokens


def sample_from_probs(probs: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, offset=0,
                      return_logprobs: bool = False):
    """Reference twin of `rlhf_fast.sample_from_probs` (no input checks; invalid rows give token -1)."""
    tokens, logprobs = sample_rows(probs, *normalize_args(probs, temperature, top_k, top_p, min_p, seed, offset),
                                   from_probs=True)
    return (tokens, logprobs) if return_logprobs else tokens
