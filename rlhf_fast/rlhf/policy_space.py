"""Which distribution an RL stage optimizes when rollouts sample with filters, and how each logprob is taken.

Sampling with ``temperature`` T and filters (``top_k``, ``top_p``, ``min_p``) draws token a_t from

    pi_K(a | s_t) = softmax_{v in K_t}(z_v / T),   K_t = the tokens the filters keep at position t

``logprob_space`` (ppo and rl sections) chooses the policy that trains:

- ``"filtered"`` (default): the policy that trains is the policy that samples, pi_K, with the kept set
  K_t of every response position fixed at its rollout value by the sampler's ``cutoffs`` (stored in the
  Rollout). Behaviour logprobs are the sampler's; the new logprobs and the entropy are those of pi_K
  (``fused_linear_logprobs(..., cutoffs=)``); the reference is restricted to the same K_t (``pi_ref_K``,
  decided on the policy's logits, through ``fused_linear_kl_divergence(..., cutoffs=, targets=,
  return_logprobs=True)``), and the KL, sampled (k1/k2/k3) or exact (``kl_kind=full``), is
  KL(pi_K || pi_ref_K). At the first minibatch the ratio is 1 at every token. Membership is a
  compare of the recomputed z_v / T with the stored cut, which the sampler places in the middle of
  the gap below K_t, so it differs from the rollout's only for a logit that moved by half that gap. After an update, the drawn token can fall out of K_t (probability 0 under
  the current pi_K): the update leaves it out of the loss and logs the fraction (``drop_left_kept``).
- ``"full"``: the unfiltered tempered distribution softmax(z / T) everywhere. The sampler's behaviour
  logprobs (of pi_K) are then not used: they are recomputed under softmax(z / T) at scoring time, so
  the ratio still starts at 1 and pi_K is treated as an off-policy behaviour policy.

Cost. With a filter on, or ``kl_kind=full``, scoring runs the reference without logits
(``return_hidden``) and one policy forward without logits that feeds both models' hidden states to
``fused_linear_kl_divergence`` on the response tokens only: one more policy forward per rollout
than without, and no (N, V) tensor. With no filter both spaces are the same distribution and,
unless ``kl_kind=full``, nothing changes from the plain path: the reference's own fused logprobs,
no cutoffs passed to any op, no extra forward.
"""
from __future__ import annotations

import torch

from .lora_stage import AdaptersOff
from .runtime import unwrap


def filters_on(c) -> bool:
    """Whether rollouts of the section `c` (ppo or rl) sample from a filtered distribution."""
    return c.top_k > 0 or c.top_p < 1.0 or c.min_p > 0.0


def uses_cutoffs(c) -> bool:
    """Whether logprobs are taken over the rollout's kept sets (filtered space with a filter on)."""
    return c.logprob_space == "filtered" and filters_on(c)


def no_cutoffs(B: int, T: int, device) -> torch.Tensor:
    """(B, T, 2) float64 cutoffs that keep every token: (-inf, 0) in every row."""
    out = torch.zeros((B, T, 2), dtype=torch.float64, device=device)
    out[..., 0] = float("-inf")
    return out


def target_cutoffs(cutoffs: torch.Tensor, prompt_len: int, width: int) -> torch.Tensor:
    """Response cutoffs (B, T, 2) -> (B, width, 2) aligned with `response_targets` (column prompt_len - 1 + t
    holds response token t's kept set; the others keep everything)."""
    B, T, _ = cutoffs.shape
    out = no_cutoffs(B, width, cutoffs.device)
    out[:, prompt_len - 1:prompt_len - 1 + T] = cutoffs
    return out


def reference_head(ref) -> torch.Tensor | None:
    """The reference's lm_head weight, or None when it is the policy's own (a LoRA policy with its adapters
    off: the head carries no adapter, and under FSDP only the policy's forward holds it unsharded)."""
    return None if isinstance(ref, AdaptersOff) else unwrap(ref).lm_head.weight


def reference_hidden(ref, sequences, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden (B, L, C_ref), lm_head weight or None) of the frozen reference: what `GPT.forward(reference=)`
    takes."""
    with torch.no_grad():
        hidden = ref(sequences, attention_mask=attention_mask, return_hidden=True)
    return hidden, reference_head(ref)


def response_terms(policy, reference, sequences, attention_mask, targets, cutoffs, prompt_len: int, T: int,
                   temperature: float, return_entropy: bool, check_kept: bool = True):
    """The policy forward with a reference: per-token (logprobs, entropy or None, kl, ref_logprobs or None),
    each (B, T) over the response columns (GPT.forward's `reference`). `targets` (B, L) as
    `response_targets`; `cutoffs` (B, L, 2) or None."""
    out = policy(sequences, targets, attention_mask=attention_mask, temperature=temperature,
                 return_entropy=return_entropy, cutoffs=cutoffs, reference=reference, check_kept=check_kept)
    cols = slice(prompt_len - 1, prompt_len - 1 + T)
    return tuple(None if t is None else t[:, cols] for t in out)


@torch.no_grad()
def score_logprobs(policy, ref, sequences, attention_mask, mask, prompt_len: int, c, behaviour: torch.Tensor,
                   cutoffs: torch.Tensor, kl_kind: str):
    """Scoring-time logprobs of a rollout under the section's definition -> (behaviour logprobs (B, T),
    reference logprobs (B, T), exact KL (B, T), NaN when kl_kind is an estimator), all float32, 0 on padding.

    behaviour: the sampler's logprobs (B, T); cutoffs: the sampler's (B, T, 2); ref None: no reference
    (the reference logprobs are the behaviour ones, the KL 0). See the module docstring.
    """
    from .rollout import response_logprobs, response_targets  # rollout builds on this module
    B, T = mask.shape
    if ref is None:  # no reference (critic-free with kl_coef 0): no KL, the reference is the policy itself
        if filters_on(c) and c.logprob_space == "full":
            behaviour = response_logprobs(policy, sequences, attention_mask, mask, prompt_len, c.temperature)[0]
        behaviour = behaviour.float().masked_fill(mask == 0, 0.0)
        return behaviour, behaviour.clone(), torch.zeros_like(behaviour)
    if not filters_on(c) and kl_kind != "full":  # the plain path: nothing extra
        ref_logprobs, _ = response_logprobs(ref, sequences, attention_mask, mask, prompt_len, c.temperature)
        return behaviour.float(), ref_logprobs.float(), torch.full_like(mask, float("nan"))
    targets = response_targets(sequences, mask, prompt_len)
    width = sequences.shape[1]
    kept = target_cutoffs(cutoffs, prompt_len, width) if uses_cutoffs(c) else None
    logp, _, kl, ref_logprobs = response_terms(policy, reference_hidden(ref, sequences, attention_mask), sequences,
                                               attention_mask, targets, kept, prompt_len, T, c.temperature,
                                               return_entropy=False)
    if c.logprob_space == "full":  # never mix the sampler's pi_K logprobs with unfiltered ones
        behaviour = logp
    m = mask > 0
    return (behaviour.float().masked_fill(~m, 0.0), ref_logprobs.float().masked_fill(~m, 0.0),
            kl.float().masked_fill(~m, 0.0) if kl_kind == "full" else torch.full_like(mask, float("nan")))


def training_cutoffs(c, cutoffs: torch.Tensor, prompt_len: int, width: int) -> torch.Tensor | None:
    """The (B, width, 2) cutoffs the update passes to the policy's logprobs, or None (no filter, or the
    full space)."""
    return target_cutoffs(cutoffs, prompt_len, width) if uses_cutoffs(c) else None



def drop_left_kept(logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An update's logprobs (B, T) over kept sets (taken with ``check_kept=False``) -> (the loss mask without
    the tokens whose drawn token has left its kept set since the rollout (logprob -inf: probability 0
    under the current pi_K, a ratio of 0 that PPO's clip would give no gradient anyway), the fraction of
    response tokens dropped)."""
    left = torch.isneginf(logprobs) & (mask > 0)
    return mask * ~left, left.sum() / (mask > 0).sum().clamp_min(1)
