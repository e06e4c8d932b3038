"""`sample` and `sample_from_probs`: temperature, top-k, top-p and min-p sampling without a sort.

Backends: "cuda" is the csrc extension (its CUDA kernel on CUDA tensors, its C++ port on CPU
tensors); "auto" uses it on both devices when it is built, else the reference; "reference" is plain
PyTorch (rlhf_fast/reference/sample.py). There is no Triton backend. All three draw the same
Philox4x32-10 uniform per row, so they return the same tokens for the same (seed, offset).
"""
from __future__ import annotations

import torch

from .. import _backend, _validate
from ..reference import sample as ref
from ._launch import host_sync_forbidden

_OP = "sample"


@torch.library.custom_op("rlhf_fast::sample", mutates_args=())
def _sample_op(x: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               min_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor, from_probs: bool, check: bool,
               backend: str, want_cutoffs: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (B,), logprobs (B,), cutoffs (B, 2) float64 with want_cutoffs, else an empty (0, 2))."""
    impl = _backend.resolve(_OP, backend, x.device, gpu="cuda", cpu="cuda")
    if impl == "reference":
        tokens, logprobs, cutoffs = ref.sample_rows(x, temperature, top_k, top_p, min_p, seed, offset, from_probs,
                                                    want_cutoffs)
    else:
        from .. import _extension
        tokens, logprobs, cutoffs = _extension.load().sample(x, temperature, top_k, top_p, min_p, seed, offset,
                                                             from_probs, want_cutoffs)
    if cutoffs is None:
        cutoffs = x.new_empty((0, 2), dtype=torch.float64)
    # the check reads the tokens on the host: skipped while that is not allowed (CUDA-graph capture);
    # invalid rows then return token -1 and logprob NaN, as with check_nan=False
    if check and not host_sync_forbidden() and bool((tokens < 0).any()):
        _raise_for_bad_row(x, temperature, top_k, top_p, min_p, from_probs, tokens)
    return tokens, logprobs, cutoffs


@_sample_op.register_fake
def _(x, temperature, top_k, top_p, min_p, seed, offset, from_probs, check, backend, want_cutoffs):
    B = x.shape[0]
    return (x.new_empty((B,), dtype=torch.int64), x.new_empty((B,), dtype=torch.float32),
            x.new_empty((B if want_cutoffs else 0, 2), dtype=torch.float64))


def _setup_context(ctx, inputs, output):
    x, temperature, top_k, top_p, min_p, _seed, _offset, from_probs, _check, _backend_name, _cutoffs = inputs
    ctx.save_for_backward(x, temperature, top_k, top_p, min_p, output[0])
    ctx.from_probs = from_probs


def _backward(ctx, _grad_tokens, grad_logprobs, _grad_cutoffs):
    """d logprob / d x with the kept set held fixed: (onehot(token) - p) / T, zero on greedy rows.

    For probabilities x = q, the chain rule through log q adds a 1 / q factor (zero where q = 0).
    The cutoffs are piecewise constant in x: no gradient.
    """
    x, temperature, top_k, top_p, min_p, tokens = ctx.saved_tensors
    p = ref.processed_log_probs(x, temperature, top_k, top_p, min_p, ctx.from_probs).exp()
    onehot = torch.zeros_like(p).scatter_(1, tokens.clamp_min(0)[:, None], 1.0)
    greedy = temperature == 0
    inv_t = torch.where(greedy, torch.zeros_like(temperature), 1.0 / torch.where(greedy, 1.0, temperature))
    grad = (onehot - p) * (grad_logprobs * inv_t)[:, None]
    if ctx.from_probs:
        xf = x.float()
        grad = torch.where(xf > 0, grad / xf, torch.zeros_like(grad))
    return grad.to(x.dtype), None, None, None, None, None, None, None, None, None, None


_sample_op.register_autograd(_backward, setup_context=_setup_context)


def _raise_for_bad_row(x, temperature, top_k, top_p, min_p, from_probs, tokens) -> None:
    """Name the argument that made a row invalid (the kernels mark such rows with token -1)."""
    row = int((tokens < 0).nonzero()[0, 0])
    r = x[row].float()
    if from_probs:
        if not bool(torch.isfinite(r).all()) or bool((r < 0).any()):
            raise ValueError(f"probs must be finite and >= 0; row {row} is not")
        if not bool((r > 0).any()):
            raise ValueError(f"probs row {row} is all zeros; each row needs positive mass")
    else:
        if bool(torch.isnan(r).any()):
            raise ValueError(f"logits row {row} contains NaN")
        if bool((r == float("inf")).any()):
            raise ValueError(f"logits row {row} contains +inf")
        if bool((r == float("-inf")).all()):
            raise ValueError(f"logits row {row} is all -inf; at least one token must be possible")
    checks = (("temperature", temperature, ">= 0", lambda v: v >= 0),
              ("top_k", top_k, ">= 0 (0 means off)", lambda v: v >= 0),
              ("top_p", top_p, "in (0, 1]", lambda v: 0 < v <= 1),
              ("min_p", min_p, "in [0, 1)", lambda v: 0 <= v < 1))
    for name, values, want, ok in checks:
        value = values[row].item()
        if not ok(value):
            raise ValueError(f"{name} must be {want}, got {value} at row {row}")
    raise ValueError(f"row {row} of the input could not be sampled")


def _check_scalar(name: str, value, integer: bool, ok, want: str) -> None:
    if isinstance(value, torch.Tensor):
        return
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an int" if integer else "a float"
        raise ValueError(f"{name} must be {kind} or a tensor, got {type(value).__name__}")
    if not ok(value):
        raise ValueError(f"{name} must be {want}, got {value}")


def check_scalar_params(temperature, top_k, top_p, min_p) -> None:
    """ValueError naming the first of the sampling parameters given as a Python number that is out of
    range (tensors are checked per row by the op)."""
    _check_scalar("temperature", temperature, False, lambda v: v >= 0, ">= 0 (0 means greedy)")
    _check_scalar("top_k", top_k, True, lambda v: v >= 0, ">= 0 (0 means off)")
    _check_scalar("top_p", top_p, False, lambda v: 0 < v <= 1, "in (0, 1]")
    _check_scalar("min_p", min_p, False, lambda v: 0 <= v < 1, "in [0, 1)")


def _check_param_tensor(name: str, value, rows: int, device: torch.device, integer: bool) -> None:
    if not isinstance(value, torch.Tensor):
        return
    if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got {value.dtype}")
    if not integer and not value.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != rows):
        raise ValueError(f"{name} must be a scalar or have shape ({rows},), got shape {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the input is on {device}")


def _check_counter(name: str, value, device: torch.device) -> None:
    if value is None and name == "seed":
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be an int64 tensor with one element, got {value.dtype} "
                             f"of shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the input is on {device}")
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
        raise ValueError(f"{name} must be an int in [0, 2**63) or an int64 tensor, got {value!r}")


def _sample(x: torch.Tensor, name: str, from_probs: bool, temperature, top_k, top_p, min_p, seed, offset,
            return_logprobs: bool, return_cutoffs: bool, backend: str, check_nan: bool):
    _backend.check_backend_arg(backend)
    _validate.check_tensor(name, x, ndim=2, dtypes=_validate.FLOAT_DTYPES)
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {x.device}")
    for flag, value in (("return_logprobs", return_logprobs), ("return_cutoffs", return_cutoffs)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be a bool, got {type(value).__name__}")
    B, V = x.shape
    if V == 0:
        raise ValueError(f"{name} must have a non-empty vocabulary dimension, got shape {tuple(x.shape)}")
    check_scalar_params(temperature, top_k, top_p, min_p)
    for pname, value, integer in (("temperature", temperature, False), ("top_k", top_k, True),
                                  ("top_p", top_p, False), ("min_p", min_p, False)):
        _check_param_tensor(pname, value, B, x.device, integer)
    _check_counter("seed", seed, x.device)
    _check_counter("offset", offset, x.device)
    args = ref.normalize_args(x, temperature, top_k, top_p, min_p, seed, offset)
    if B == 0:
        tokens, logprobs = x.new_empty((0,), dtype=torch.int64), x.new_empty((0,), dtype=torch.float32)
        cutoffs = x.new_empty((0, 2), dtype=torch.float64)
    else:
        tokens, logprobs, cutoffs = _sample_op(x, *args, from_probs, check_nan, backend, return_cutoffs)
    out = (tokens,) + ((logprobs,) if return_logprobs else ()) + ((cutoffs,) if return_cutoffs else ())
    return out if len(out) > 1 else tokens


def sample(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, offset=0,
           return_logprobs: bool = False, return_cutoffs: bool = False, backend: str = "auto",
           check_nan: bool = True):
    """Draw one token per row from temperature / top-k / top-p / min-p processed logits, without sorting.

    Args:
        logits: (B, V) float32, float16 or bfloat16, on CPU or CUDA. Processing is in float32.
        temperature: float >= 0 or (B,) float tensor. 0 means greedy (argmax; lowest index on ties).
        top_k: int >= 0 or (B,) integer tensor; 0 means off. Keeps every token tied with the k-th value.
        top_p: float in (0, 1] or (B,) float tensor; 1 means off.
        min_p: float in [0, 1) or (B,) float tensor; 0 means off.
        seed: int in [0, 2**63), a one-element int64 tensor (on CUDA it may live on the GPU, so a
            CUDA graph can replay the step with no host sync), or None (drawn from torch's RNG).
        offset: int >= 0 or one-element int64 tensor; advance it every step (e.g. the decode position).
        return_logprobs: also return the (B,) float32 log-probability of each drawn token under the
            processed distribution (0 for greedy rows): the behaviour policy's logprob for PPO.
            It is differentiable w.r.t. logits with the kept set held fixed.
        return_cutoffs: also return each row's kept set as cutoffs (B, 2) float64 (see below), for
            `token_logprobs(..., cutoffs=)` / `fused_linear_logprobs(..., cutoffs=)` to score the
            drawn tokens under the same filtered distribution. Computing them costs nothing when False.
        backend: "auto", "cuda" (csrc extension: CUDA kernel or its C++ port on CPU) or "reference".
        check_nan: raise ValueError for NaN / +inf logits, all -inf rows and out-of-range per-row
            parameters. It costs one device-to-host sync of a (B,) tensor; with False (and during
            CUDA-graph capture, where a sync is not allowed), such rows return token -1 and logprob
            NaN instead (never a valid-looking token).

    Returns:
        tokens (B,) int64; (tokens, logprobs) with return_logprobs; (tokens, cutoffs) with
        return_cutoffs; (tokens, logprobs, cutoffs) with both.

    Semantics: transformers' warpers with min_tokens_to_keep=1, in this order, in float32::

        s = logits.float() / temperature
        s[s < topk(s, k).values[:, -1:]] = -inf                           # TopKLogitsWarper
        s[ascending cumsum(softmax(sorted s)) <= 1 - top_p] = -inf, top token kept  # TopPLogitsWarper
        p = softmax(s); s[p < min_p * p.max()] = -inf                     # MinPLogitsWarper
        token = first i with cumsum(exp(s - s.max()))[i] > u * sum(exp(s - s.max()))

    where u in [0, 1) is the top 24 bits of Philox4x32-10(counter=(row, 0, offset), key=seed) word 0.
    Ties: top-k keeps every token equal to the k-th value. When the top-p cut falls inside a run of
    tied tokens, the lowest-index ones go first: exactly TopPLogitsWarper with a stable sort
    (``torch.sort(s, stable=True)``). Its default CPU sort is unstable beyond 16 tokens, so stock
    transformers removes as many tied tokens but arbitrary ones. bf16 logits tie often, so this
    matters. min-p keeps ties. The draw walks the vocabulary in index order, so nothing is sorted.

    Cutoffs: with x = float32(logits) / float32(temperature) (exactly `s` above), each filter keeps
    an upper set of the tokens ordered by (x, index), so their intersection, the kept set, is one too,
    and a row's cutoff (t, i) = (cutoffs[b, 0], cutoffs[b, 1]) describes it exactly::

        token v is kept  <=>  x[v] > t  or  (x[v] == t and v >= i)      # compare in float32

    t lies in the kept set's gap: with lo the lowest kept x and hi the highest removed x,
    t = float32((hi + lo) / 2) (lo when that rounds down to hi) and i = 0, so logits recomputed by
    another kernel (a training forward instead of the decode step) give the same set unless one moved
    by half the gap. When the top-p cut splits a tie (hi == lo), t = lo and i = the lowest index it
    keeps among the tied tokens: there any recomputation that breaks the tie can change the set. t is
    a float32 value stored exactly in float64, i an integer-valued float64; identical on every
    backend. Rows where no token was removed (or only x = -inf ones): (-inf, 0). Greedy rows:
    (x_max, argmax) of the untempered logits (a point mass; a tempered logprob op needs
    temperature > 0, so such rows have no trainable distribution). Invalid rows (token -1): (NaN, 0).
    Cutoffs carry no gradient.
    """
    return _sample(logits, "logits", False, temperature, top_k, top_p, min_p, seed, offset,
                   return_logprobs, return_cutoffs, backend, check_nan)


def sample_from_probs(probs: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=None,
                      offset=0, return_logprobs: bool = False, return_cutoffs: bool = False, backend: str = "auto",
                      check_nan: bool = True):
    """`sample` for callers that hold probabilities: identical to ``sample(torch.log(probs), ...)``.

    probs: (B, V) float32, float16 or bfloat16, finite, >= 0, each row with positive mass (rows need
    not be normalized). Every other argument and the return value are as in `sample`; check_nan
    rejects negative, NaN or infinite probabilities and all-zero rows. Cutoffs are on
    x = float32(log(probs)) / temperature (greedy rows: log(probs)); zero probabilities are x = -inf.
    """
    return _sample(probs, "probs", True, temperature, top_k, top_p, min_p, seed, offset,
                   return_logprobs, return_cutoffs, backend, check_nan)
