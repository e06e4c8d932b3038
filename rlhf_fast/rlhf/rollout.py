"""PPO rollouts: sample responses, then score them with the reference, value and reward models.

Layout of a rollout batch (B rows): ``sequences`` (B, P + T) = prompt left-padded to the longest prompt
of the dataset (P) + response (T = max_new_tokens, padded after EOS); ``attention_mask`` marks real
tokens. Per-token tensors are (B, T), aligned with the response tokens: column t holds the logprob of
response token t, the value of the state before it, and so on.

Prompts are generated in fixed chunks of ``gen_batch_size`` with a seed per (iteration, chunk), and
chunk j runs on rank j % world: the samples are the same whatever the number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

import rlhf_fast

from .data import IGNORE_INDEX
from .microbatch import in_chunks
from .policy_space import no_cutoffs, score_logprobs
from .reward_fns import call_reward_fn
from .runtime import Runtime, unwrap


@dataclass
class Rollout:
    sequences: torch.Tensor  # (B, P + T) int64
    attention_mask: torch.Tensor  # (B, P + T) int64
    mask: torch.Tensor  # (B, T) float: 1 on response tokens (EOS included)
    logprobs: torch.Tensor  # (B, T) behaviour logprobs (policy_space.py: the sampler's, or recomputed)
    ref_logprobs: torch.Tensor  # (B, T) under the frozen SFT reference, same temperature and space
    values: torch.Tensor  # (B, T) V(s_t) of the value model
    scores: torch.Tensor  # (B,) reward-model (and/or reward_fn) score, EOS penalty applied
    task_scores: torch.Tensor  # (B,) hidden task score (NaN when there is no scorer)
    has_eos: torch.Tensor  # (B,) float
    cutoffs: torch.Tensor | None = None  # (B, T, 2) float64 the sampler's kept set per token; None: no filter
    kl: torch.Tensor | None = None  # (B, T) exact KL(pi || pi_ref) per position (kl_kind=full); None: NaN

    def __post_init__(self):  # a rollout sampled without filters (or built by hand) keeps every token
        if self.cutoffs is None:
            self.cutoffs = no_cutoffs(*self.mask.shape, self.mask.device)
        if self.kl is None:
            self.kl = torch.full(self.mask.shape, float("nan"), device=self.mask.device)

    def index(self, rows: torch.Tensor) -> "Rollout":
        return Rollout(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @staticmethod
    def cat(parts: list["Rollout"]) -> "Rollout":
        return Rollout(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Rollout)})


def response_targets(sequences: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(B, P + T) targets: at column c the next token when it is a response token, else IGNORE_INDEX."""
    T = mask.shape[1]
    targets = torch.full_like(sequences, IGNORE_INDEX)
    cols = slice(prompt_len - 1, prompt_len - 1 + T)
    targets[:, cols] = sequences[:, prompt_len:].masked_fill(mask == 0, IGNORE_INDEX)
    return targets


def response_logprobs(policy, sequences, attention_mask, mask, prompt_len: int, temperature: float,
                      return_entropy: bool = False, cutoffs: torch.Tensor | None = None, check_kept: bool = True):
    """Per-token logprobs (B, T) (and entropy) of the response under `policy`, logits / temperature,
    through the fused linear-logprob op inside the model (no (B, T, V) logits); over each position's
    kept set when `cutoffs` (B, P + T, 2) is given (policy_space.training_cutoffs), where a token off
    its set raises, or with check_kept=False gets -inf (policy_space.drop_left_kept)."""
    T = mask.shape[1]
    targets = response_targets(sequences, mask, prompt_len)
    logprobs, entropy = policy(sequences, targets, attention_mask=attention_mask, temperature=temperature,
                               return_entropy=return_entropy, cutoffs=cutoffs, check_kept=check_kept)
    cols = slice(prompt_len - 1, prompt_len - 1 + T)
    return logprobs[:, cols], (entropy[:, cols] if entropy is not None else None)


def response_token_loss(policy, sequences, attention_mask, mask, prompt_len: int, temperature: float, loss_fn,
                        reference=None):
    """A policy loss known in the forward, through the GPT's fused lm_head pass (GPT.forward's token_loss):
    returns (loss with its gradient, TokenStats (logp, entropy, kl or None without `reference`) over the
    response, (B, T) each, detached). loss_fn sees the flat positions of the model's (B, P + T) layout
    (`spread_response` lays out its constants)."""
    T = mask.shape[1]
    targets = response_targets(sequences, mask, prompt_len)
    loss, stats = policy(sequences, targets, attention_mask=attention_mask, temperature=temperature,
                         return_entropy=True, reference=reference, token_loss=loss_fn)
    cols = slice(prompt_len - 1, prompt_len - 1 + T)
    return loss, type(stats)(*(None if x is None else x[:, cols] for x in stats))


def spread_response(x: torch.Tensor, width: int, prompt_len: int) -> torch.Tensor:
    """(B, T) per-response-token values -> flat (B * width,) over the model's positions (response_targets'
    layout: token t of the response is scored at position prompt_len - 1 + t), 0 elsewhere."""
    B, T = x.shape
    full = x.new_zeros(B, width)
    full[:, prompt_len - 1:prompt_len - 1 + T] = x
    return full.reshape(-1)


def response_values(value_model, sequences, attention_mask, prompt_len: int, T: int) -> torch.Tensor:
    """(B, T): the value of the state before each response token (0 after a row's last real token)."""
    read = torch.zeros(sequences.shape, dtype=torch.bool, device=sequences.device)
    read[:, prompt_len - 1:prompt_len - 1 + T] = True  # the prompt's other positions skip the last block's MLP
    values = value_model(sequences, attention_mask=attention_mask, outputs_at=read)  # (B, P + T)
    return values[:, prompt_len - 1:prompt_len - 1 + T]


def left_pad(prompts: list[list[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        out[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return out, mask


def _is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def _stop_at_eos(tokens: torch.Tensor, logprobs: torch.Tensor, stop_ids, pad_id: int):
    """Rows of a fixed-length sample cut after their first stop id -> (tokens, logprobs, mask), as
    generate's own EOS handling would return them."""
    is_eos = torch.isin(tokens, torch.tensor(stop_ids, device=tokens.device)).long()
    mask = (is_eos.cumsum(1) - is_eos) == 0  # up to and including the first EOS
    return tokens.masked_fill(~mask, pad_id), logprobs.masked_fill(~mask, 0.0), mask.long()


@torch.no_grad()
def generate_chunk(policy, prompts: list[list[int]], prompt_len: int, tok, *, max_new_tokens: int,
                   temperature: float, top_k: int, top_p: float, seed: int, device, min_p: float = 0.0,
                   return_cutoffs: bool = False):
    """Sample one chunk -> (sequences, attention_mask, response mask (float), behaviour logprobs), and the
    sampler's cutoffs (B, T, 2) when `return_cutoffs` ((-inf, 0) everywhere, not asked of the sampler, when
    no filter is on).

    An FSDP-sharded policy has its root parameters gathered for the whole call (generation calls the
    blocks, whose hooks gather their own, but not the root's forward), and samples every row for
    max_new_tokens steps: stopping early when all rows hit EOS would differ between ranks, and every
    rank must join the same collectives. The rows are cut after EOS as generate would cut them.
    """
    idx, pmask = left_pad(prompts, prompt_len, tok.pad_id)
    stop = tok.stop_ids[0] if len(tok.stop_ids) == 1 else list(tok.stop_ids)  # EOS, and a chat's end of turn
    model = unwrap(policy)
    fsdp = _is_fsdp(model)
    if fsdp:
        model.unshard()
    filtered = top_k > 0 or top_p < 1.0 or min_p > 0.0
    kw = {"return_cutoffs": True} if return_cutoffs and filtered else {}
    gen = model.generate(idx.to(device), max_new_tokens, attention_mask=pmask.to(device), temperature=temperature,
                         top_k=top_k, top_p=top_p, min_p=min_p, eos_token_id=None if fsdp else stop,
                         pad_token_id=tok.pad_id, seed=seed, **kw)
    tokens, logprobs, mask = gen.tokens, gen.logprobs, gen.mask
    cutoffs = gen.cutoffs if kw else no_cutoffs(*tokens.shape, tokens.device)
    if fsdp:
        model.reshard()
        tokens, logprobs, mask = _stop_at_eos(tokens, logprobs, tok.stop_ids, tok.pad_id)
        cutoffs = torch.where(mask[..., None] > 0, cutoffs, no_cutoffs(*mask.shape, mask.device))
    sequences = torch.cat((idx.to(device), tokens), 1)
    attention_mask = torch.cat((pmask.to(device), mask), 1)
    if return_cutoffs:
        return sequences, attention_mask, mask.float(), logprobs, cutoffs
    return sequences, attention_mask, mask.float(), logprobs


def decode_rows(tok, sequences: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> tuple[list[str], list[str]]:
    """Prompt and response texts of each row (EOS and padding dropped)."""
    prompts, responses = [], []
    for seq, m in zip(sequences.tolist(), mask.tolist()):
        prompt = [t for t in seq[:prompt_len] if t not in (tok.pad_id, tok.bos_id)]
        resp = [t for t, keep in zip(seq[prompt_len:], m) if keep and t not in tok.stop_ids]
        prompts.append(tok.decode(prompt))
        responses.append(tok.decode(resp))
    return prompts, responses


@torch.no_grad()
def make_rollout(policy, ref_policy, value_model, reward_model, prompts: list[list[int]], prompt_len: int, tok,
                 cfg, seed: int, device, reward_fn=None, scorer=None) -> Rollout:
    """Generate and score one chunk of prompts on this rank."""
    c = cfg.ppo
    seqs, amask, mask, logprobs, cutoffs = generate_chunk(
        policy, prompts, prompt_len, tok, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
        top_k=c.top_k, top_p=c.top_p, min_p=c.min_p, seed=seed, device=device, return_cutoffs=True)
    size = cfg.train.score_batch_size  # scoring forwards of at most this many rows (0: the whole chunk)
    logprobs, ref_logprobs, kl = in_chunks(
        lambda s, a, m, lp, cut: score_logprobs(policy, ref_policy, s, a, m, prompt_len, c, lp, cut, c.kl_kind),
        size, seqs, amask, mask, logprobs, cutoffs)
    values = in_chunks(lambda s, a: response_values(value_model, s, a, prompt_len, mask.shape[1]), size, seqs, amask)
    stop = torch.tensor(tok.stop_ids, device=seqs.device)
    has_eos = (torch.isin(seqs[:, prompt_len:], stop) & (mask > 0)).any(1).float()
    texts = decode_rows(tok, seqs, mask, prompt_len) if (reward_fn is not None or scorer is not None) else None
    scores = torch.zeros(len(prompts), device=device)
    if c.reward_mode in ("model", "sum"):
        scores += in_chunks(lambda s, a: reward_model(s, attention_mask=a), size, seqs, amask).float()
    if c.reward_mode in ("fn", "sum"):
        scores += call_reward_fn(reward_fn, *texts).to(device=device, dtype=scores.dtype)
    scores -= c.missing_eos_penalty * (1.0 - has_eos)
    task = (call_reward_fn(scorer, *texts).to(device=device, dtype=torch.float32) if scorer is not None
            else torch.full((len(prompts),), float("nan"), device=device))
    return Rollout(seqs, amask, mask, logprobs.float(), ref_logprobs.float(), values.float(), scores, task, has_eos,
                   cutoffs, kl)


def kl_per_token(rollout: Rollout, kind: str) -> torch.Tensor:
    """(B, T) KL penalty of the behaviour policy against the reference, 0 on padding: a sampled estimate
    (k1, k2, k3), or with kind "full" the exact per-position KL taken at scoring time."""
    if kind == "full":
        return torch.where(rollout.mask > 0, rollout.kl, 0.0)
    kl = rlhf_fast.kl_penalty(rollout.logprobs, rollout.ref_logprobs, kind)
    return kl * rollout.mask


def gather_rollout(rt: Runtime, local: Rollout, chunk: int) -> Rollout:
    """Every rank's chunks of `chunk` rows, in global chunk order (chunk j = k * world + r came from
    rank r as its k-th chunk), so every rank holds the batch a single process would have made."""
    if rt.world == 1:
        return local

    def gather(t: torch.Tensor) -> torch.Tensor:
        g = rt.all_gather_cat(t).view(rt.world, -1, chunk, *t.shape[1:])  # (world, K, chunk, ...)
        return g.transpose(0, 1).reshape(-1, *t.shape[1:])  # (K * world * chunk, ...)

    return Rollout(**{f.name: gather(getattr(local, f.name)) for f in fields(Rollout)})
