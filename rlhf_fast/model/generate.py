"""Batched sampling from a GPT: prefill once, then one decode step per new token over a static KV cache.

Ragged prompts are left-aligned (right-padded) before prefill, so every row's cache starts at slot 0
and holds only its own tokens: prefill runs the padded `causal_attention` (pads after a row's last
token are invisible to it), and each decode step appends at the row's own length and attends with
`decode_attention(..., cache_seqlens)`. No pad token ever enters a row's attention.
"""
from __future__ import annotations

import operator

from dataclasses import dataclass

import torch

import rlhf_fast

from ..ops.sample import check_scalar_params
from ..reference import sample as sample_ref
from .gpt import GPT
from .layers import KVCache

# how often (in steps) the host checks whether every row has hit EOS; each check is a device sync
_STOP_CHECK_EVERY = 8


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # (B, max_new_tokens) int64: sampled tokens, pad_token_id after a row's EOS
    logprobs: torch.Tensor  # (B, max_new_tokens) fp32: each token's logprob under the processed distribution; 0 on pads
    mask: torch.Tensor  # (B, max_new_tokens) int64: 1 for real response tokens (EOS included), 0 for padding
    prompts: torch.Tensor  # (B, P) int64: the prompts, left-padded with pad_token_id to the longest, P
    prompt_mask: torch.Tensor  # (B, P) int64: 1 on real prompt tokens
    # (B, max_new_tokens, 2) float64 with return_cutoffs, else None: each step's kept set as
    # `rlhf_fast.sample(..., return_cutoffs=True)` reports it; (-inf, 0) (no filter) on pads
    cutoffs: torch.Tensor | None = None

    @property
    def sequences(self) -> torch.Tensor:
        """(B, P + max_new_tokens) prompt + response; pass `attention_mask` along to the model."""
        return torch.cat((self.prompts, self.tokens), dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + max_new_tokens): one contiguous run of real tokens per row, as GPT.forward expects."""
        return torch.cat((self.prompt_mask, self.mask), dim=1)


def prefill(model: GPT, idx: torch.Tensor, lengths: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Right-padded prompts idx (B, P), lengths (B,) -> next-token logits (B, V) fp32; fills the cache."""
    return model.prefill(idx, lengths, cache)


def decode_one_token(model: GPT, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """token (B,) appended to each row's cache -> next-token logits (B, V) fp32. Static shapes throughout."""
    return model.decode(token, cache)


def sampling_state(sampling: dict, B: int, device: torch.device) -> dict:
    """The keyword arguments of `rlhf_fast.sample` for every decode step, all on the device.

    Per-row parameters become (B,) tensors of the dtypes the op itself converts scalars to
    (reference.sample.PARAM_DTYPES: top_p stays float64, since float32(0.9) would move the top-p cut and
    draw other tokens than an eager call), seed and offset one-element int64 tensors; the caller bumps
    offset in place after each step (step i samples at offset i). A step then reads nothing from the
    host: no sync per token, and a CUDA graph can replay it. seed None draws one from torch's (CPU) RNG.
    """
    seed = sampling["seed"]
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # the CPU generator: no device sync
    state = {name: torch.full((B,), sampling[name], dtype=dtype, device=device)
             for name, dtype in sample_ref.PARAM_DTYPES.items()}
    state.update(seed=torch.tensor([seed], dtype=torch.int64, device=device),
                 offset=torch.zeros(1, dtype=torch.int64, device=device))
    return state


def _collect(n: int, B: int, device: torch.device, next_token, eos_token_id: int | None, pad_token_id: int,
             return_cutoffs: bool = False):
    """Call next_token(i) -> (token, logprob, cutoff), (B,), (B,) and (B, 2) or None, for i < n -> tokens,
    logprobs, mask, each (B, n), and with return_cutoffs the cutoffs (B, n, 2), else None.

    A row that emitted EOS keeps stepping (shapes stay static) but its outputs become padding. The host
    syncs only every _STOP_CHECK_EVERY steps (when every row may be done) and once at the end: the
    sampler's per-step input check is off (it syncs), so a row it could not sample (token -1: NaN or
    +inf logits, all -inf) is reported then, naming the step.
    """
    tokens = torch.full((B, n), pad_token_id, dtype=torch.int64, device=device)
    logprobs = torch.zeros((B, n), dtype=torch.float32, device=device)
    mask = torch.zeros((B, n), dtype=torch.int64, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    unsampled = torch.zeros((B, n), dtype=torch.bool, device=device)
    cutoffs = None
    if return_cutoffs:
        no_filter = torch.tensor([float("-inf"), 0.0], dtype=torch.float64, device=device)
        cutoffs = no_filter.expand(B, n, 2).clone()
    for i in range(n):
        token, logprob, cutoff = next_token(i)
        unsampled[:, i] = (token < 0) & ~done
        tokens[:, i] = token.masked_fill(done, pad_token_id)
        logprobs[:, i] = logprob.float().masked_fill(done, 0.0)
        if return_cutoffs:
            cutoffs[:, i] = torch.where(done[:, None], no_filter, cutoff)
        mask[:, i] = (~done).long()
        if eos_token_id is not None:
            done |= _is_eos(token, eos_token_id)
            if (i + 1) % _STOP_CHECK_EVERY == 0 and bool(done.all()):
                break
    if bool(unsampled.any()):
        row, step = (int(v) for v in unsampled.nonzero()[0])
        raise ValueError(f"generate: step {step} could not sample row {row}: its logits hold NaN or +inf, or are "
                         "all -inf (the model produced non-finite values)")
    return tokens, logprobs, mask, cutoffs


def decode_n_tokens(model: GPT, logits: torch.Tensor, cache: KVCache | None, n: int, sampling: dict,
                    eos_token_id: int | None, pad_token_id: int, recompute=None, return_cutoffs: bool = False):
    """Sample n tokens per row starting from `logits` (B, V) -> tokens, logprobs, mask, each (B, n), and
    with return_cutoffs each step's cutoffs (B, n, 2) (see `_collect`).

    Step i samples with seed offset i (see `sampling_state`); EOS handling as in `_collect`.
    `recompute(token, step)` replaces the cached decode step with a full forward over everything so
    far (the no-cache path used to check the cache).
    """
    B, device = logits.shape[0], logits.device
    state = sampling_state(sampling, B, device)
    token = None

    def next_token(i):
        nonlocal logits, token
        if i > 0:
            token = token.clamp_min(0)  # -1 (an unsampled row) is reported by _collect
            logits = recompute(token, i) if recompute is not None else decode_one_token(model, token, cache)
        token, logprob, *cutoff = rlhf_fast.sample(logits, return_logprobs=True, return_cutoffs=return_cutoffs,
                                                   check_nan=False, backend=sampling["backend"], **state)
        state["offset"].add_(1)
        return token, logprob, (cutoff[0] if cutoff else None)

    out = _collect(n, B, device, next_token, eos_token_id, pad_token_id, return_cutoffs)
    return out if return_cutoffs else out[:3]


def decode_n_tokens_graphed(model: GPT, logits: torch.Tensor, cache: KVCache, n: int, sampling: dict,
                            eos_token_id: int | None, pad_token_id: int, return_cutoffs: bool = False):
    """`decode_n_tokens` with each step (sample, then decode the sampled token) replayed from one CUDA graph.

    Everything the step reads lives on the device at a fixed address: logits, `sampling_state` (offset
    advances inside the graph), the cache and its per-row lengths; so it draws what the eager loop draws.
    """
    B, device = logits.shape[0], logits.device
    params = sampling_state(sampling, B, device)
    static_logits = logits.clone()
    token = torch.zeros(B, dtype=torch.int64, device=device)
    logprob = torch.zeros(B, dtype=torch.float32, device=device)
    cutoff = torch.zeros((B, 2), dtype=torch.float64, device=device) if return_cutoffs else None

    def step():
        tok, lp, *cut = rlhf_fast.sample(static_logits, return_logprobs=True, return_cutoffs=return_cutoffs,
                                         check_nan=False, backend=sampling["backend"], **params)
        token.copy_(tok)
        logprob.copy_(lp)
        if return_cutoffs:
            cutoff.copy_(cut[0])
        static_logits.copy_(decode_one_token(model, tok.clamp_min(0), cache))  # -1: reported by _collect
        params["offset"].add_(1)

    # warm up on a side stream (compiles kernels, allocates), then undo the state the warm-up advanced
    saved_lengths = cache.seqlens.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    cache.seqlens.copy_(saved_lengths)
    params["offset"].zero_()
    static_logits.copy_(logits)

    def next_token(i):
        graph.replay()  # the last replay also decodes its token, at slot len + n - 1 < P + n
        return token, logprob, cutoff

    out = _collect(n, B, device, next_token, eos_token_id, pad_token_id, return_cutoffs)
    return out if return_cutoffs else out[:3]


@torch.no_grad()
def generate(model: GPT, prompts, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int = 0, seed: int | None = None,
             use_cache: bool = True, cuda_graph: bool = False,
             sample_backend: str | None = None, group_size: int = 1,
             return_cutoffs: bool = False) -> GenerationOutput:
    """Sample up to `max_new_tokens` tokens after each prompt.

    prompts: a list of B 1-D int tensors of any lengths >= 1, or a (B, P) int tensor; with a tensor,
        `attention_mask` (B, P) marks the real tokens (one contiguous run per row, e.g. left padding).
    temperature, top_k, top_p, min_p: as `rlhf_fast.sample` (its docstring defines greedy decoding
        and the order of the filters). The returned logprobs are those `sample` reports: the chosen
        tokens' logprobs under the processed (tempered, filtered) distribution.
    eos_token_id: a row stops after emitting it, or any id of a list (EOS is kept, mask 1); later slots
        get pad_token_id, logprob 0, mask 0. None: every row runs max_new_tokens.
    seed: with a seed, step i calls `rlhf_fast.sample(seed=seed, offset=i)`, so the same call gives the
        same tokens; None draws fresh randomness.
    use_cache: False reruns the full forward over all tokens for every new token (slow; the oracle
        that the KV cache is checked against).
    sample_backend: backend of `rlhf_fast.sample` (whose fused kernel is the "cuda" extension, not
        Triton); None means "reference" when model.config.backend is "reference", else "auto".
    cuda_graph: capture one decode step (sampling + `decode_one_token`) in a CUDA graph and replay it
        for every new token (`decode_n_tokens_graphed`); CUDA tensors and use_cache only. Every
        sampling option works under the graph, greedy and seeded ones included: the step has static
        shapes (preallocated cache, per-row lengths and positions on the device) and the sampler
        reads seed and offset from device tensors, so a seeded call returns the same tokens with or
        without the graph. seed=None draws the seed from torch's RNG once, for either path.
        Neither path syncs with the host per token: only the EOS test every few steps and one check
        at the end, which raises ValueError naming the step if a row's logits were NaN or +inf.
    group_size: G >= 1 samples per prompt, returned as B * G rows (prompt b's samples are rows
        b*G .. b*G + G-1). With the cache, each prompt is prefilled once and its cache broadcast to its
        G rows, and the rows are then sampled exactly as if each prompt had been given G times.
    return_cutoffs: also return `.cutoffs` (B, max_new_tokens, 2) float64, each step's kept set as
        `rlhf_fast.sample(..., return_cutoffs=True)` defines it ((-inf, 0) on pads after EOS), so
        `token_logprobs` / `fused_linear_logprobs(..., cutoffs=)` score the responses under the
        distribution they were drawn from. False (default) computes nothing extra.

    Prompt length + max_new_tokens must fit in model.config.block_size. The model is not switched to
    eval mode: call model.eval() first if it has dropout.
    """
    if not isinstance(model, GPT) or model.head != "lm":
        raise ValueError("model must be a GPT with head='lm'")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if not isinstance(return_cutoffs, bool):
        raise ValueError(f"return_cutoffs must be a bool, got {type(return_cutoffs).__name__}")
    device = next(model.parameters()).device
    if isinstance(eos_token_id, (list, tuple)):  # several stop ids (chat models): a (K,) tensor, made before capture
        if not eos_token_id or not all(isinstance(e, int) and not isinstance(e, bool) for e in eos_token_id):
            raise ValueError(f"eos_token_id must be an int or a non-empty list of ints, got {eos_token_id!r}")
        eos_token_id = torch.tensor(eos_token_id, dtype=torch.int64, device=device)
    idx, lengths, prompts_left, prompt_mask = _right_pad(prompts, attention_mask, pad_token_id, device)
    _check_token_ids(idx, lengths, eos_token_id, pad_token_id, model.config.vocab_size)
    if group_size > 1:
        prompts_left, prompt_mask = (t.repeat_interleave(group_size, 0) for t in (prompts_left, prompt_mask))
        if not use_cache:  # the no-cache oracle simply runs every row
            idx, lengths = idx.repeat_interleave(group_size, 0), lengths.repeat_interleave(group_size, 0)
    B, P = idx.shape
    if P + max_new_tokens > model.config.block_size:
        raise ValueError(f"longest prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"block_size={model.config.block_size}")
    check_scalar_params(temperature, top_k, top_p, min_p)
    if sample_backend is None:
        sample_backend = "reference" if model.config.backend == "reference" else "auto"
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                    backend=sample_backend)
    if cuda_graph and (device.type != "cuda" or not use_cache):
        raise ValueError(f"cuda_graph=True needs a model on CUDA and use_cache=True (model is on {device.type}, "
                         f"use_cache={use_cache})")
    if use_cache:
        cache_dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                       else next(model.parameters()).dtype)
        # grouped: the prompts' own cache holds only their P slots; the G-fold one gets room to decode
        cache = KVCache(model.config, B, P if group_size > 1 else P + max_new_tokens, device, cache_dtype)
        logits = prefill(model, idx, lengths, cache)
        if group_size > 1:
            logits, cache = _broadcast_prefill(model, logits, cache, group_size, P + max_new_tokens)
        recompute = None
    else:
        cache = None
        buf = torch.cat((idx, idx.new_zeros((B, max_new_tokens))), 1)
        rows = torch.arange(B, device=device)

        def recompute(token, step):  # append token (B,) as new token number `step`, rerun everything
            if token is not None:
                buf[rows, lengths.long() + step - 1] = token
            out = model(buf[:, :P + step])  # (B, P + step, V), right-padded rows
            return out[rows, lengths.long() + step - 1].float()  # logits after each row's last token

        logits = recompute(None, 0)
    if cuda_graph:
        out = decode_n_tokens_graphed(model, logits, cache, max_new_tokens, sampling, eos_token_id, pad_token_id,
                                      return_cutoffs)
    else:
        out = decode_n_tokens(model, logits, cache, max_new_tokens, sampling, eos_token_id, pad_token_id,
                              recompute, return_cutoffs)
    tokens, logprobs, mask, *cutoffs = out
    return GenerationOutput(tokens, logprobs, mask, prompts_left, prompt_mask, cutoffs[0] if cutoffs else None)


def _broadcast_prefill(model: GPT, logits: torch.Tensor, cache: KVCache, group_size: int,
                       max_len: int) -> tuple[torch.Tensor, KVCache]:
    """The prefill of B prompts as that of B * G rows: each prompt's logits (B, V) and cache repeated
    for its G consecutive rows, in a new cache of `max_len` slots."""
    L, B, H, P, D = cache.k.shape
    grouped = KVCache(model.config, B * group_size, max_len, cache.k.device, cache.k.dtype)
    for new, old in ((grouped.k, cache.k), (grouped.v, cache.v)):  # broadcast in place: no (B * G)-row temporary
        new.view(L, B, group_size, H, max_len, D)[..., :P, :] = old[:, :, None]  # (n_layer, B, G, n_kv_head, P, hs)
    grouped.seqlens.copy_(cache.seqlens.repeat_interleave(group_size, 0))
    return logits.repeat_interleave(group_size, 0), grouped


def _is_eos(token: torch.Tensor, eos) -> torch.Tensor:
    """token (B,) -> (B,) bool: equal to the EOS id, or to any of a (K,) tensor of them."""
    return token == eos if not isinstance(eos, torch.Tensor) else (token[:, None] == eos).any(-1)


def _check_mask_rows(attention_mask: torch.Tensor) -> None:
    """Each row of a (B, P) prompt mask is 0/1 with one run of 1s (left and/or right padding, no holes)."""
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    m = attention_mask.to(torch.int64)
    starts = (m[:, 1:] > m[:, :-1]).sum(1) + m[:, 0]  # number of runs of 1s in each row
    bad = (starts != 1).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        what = "no token" if int(m[row].sum()) == 0 else "a hole (0s between 1s)"
        raise ValueError(f"attention_mask row {row} has {what}: each row must be one run of 1s, padded "
                         f"left and/or right, got {m[row].tolist()}")


def _check_token_ids(idx: torch.Tensor, lengths: torch.Tensor, eos_token_id, pad_token_id, vocab: int) -> None:
    """Prompt tokens, EOS and pad ids are ids of the model's vocabulary (ValueError naming the one that is
    not: an embedding lookup would raise a bare IndexError, or read out of bounds on a GPU)."""
    real = torch.arange(idx.shape[1], device=idx.device) < lengths[:, None].long()
    bad = (real & ((idx < 0) | (idx >= vocab))).nonzero()
    if bad.numel():
        row, col = (int(v) for v in bad[0])
        raise ValueError(f"prompts[{row}] holds token id {int(idx[row, col])} at position {col}, outside the "
                         f"model's vocabulary [0, {vocab})")
    eos = [] if eos_token_id is None else (eos_token_id.tolist() if isinstance(eos_token_id, torch.Tensor)
                                           else [eos_token_id])
    for name, ids in (("eos_token_id", eos), ("pad_token_id", [pad_token_id])):
        for i in ids:
            try:
                ok = not isinstance(i, bool) and 0 <= operator.index(i) < vocab
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(f"{name} must be an id of the model's vocabulary [0, {vocab}), got {i!r}")


def _right_pad(prompts, attention_mask, pad_token_id: int, device):
    """-> idx (B, P) right-padded with token 0 (any valid id: pads are never attended), lengths (B,) int32,
    and the same prompts left-padded with pad_token_id, with their mask."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.dtype not in (torch.int64, torch.int32) or prompts.shape[1] == 0:
            raise ValueError(f"prompts as a tensor must be (B, P) int with P >= 1, got {tuple(prompts.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(prompts)
        elif attention_mask.shape != prompts.shape:
            raise ValueError(f"attention_mask must have the shape of prompts {tuple(prompts.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        _check_mask_rows(attention_mask)
        mask = attention_mask.to(torch.bool)
        prompts = [row[m] for row, m in zip(prompts, mask)]
    elif attention_mask is not None:
        raise ValueError("attention_mask is only accepted with prompts given as a (B, P) tensor")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of 1-D int tensors or a (B, P) int tensor")
    for i, p in enumerate(prompts):
        if (not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() == 0
                or p.dtype not in (torch.int64, torch.int32)):
            raise ValueError(f"prompts[{i}] must be a non-empty 1-D int tensor, got "
                             f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
    B, P = len(prompts), max(p.numel() for p in prompts)
    idx = torch.zeros((B, P), dtype=torch.int64, device=device)
    left = torch.full((B, P), pad_token_id, dtype=torch.int64, device=device)
    left_mask = torch.zeros((B, P), dtype=torch.int64, device=device)
    for b, p in enumerate(prompts):
        n = p.numel()
        idx[b, :n] = p
        left[b, P - n:] = p
        left_mask[b, P - n:] = 1
    lengths = torch.tensor([p.numel() for p in prompts], dtype=torch.int32, device=device)
    return idx, lengths, left, left_mask
