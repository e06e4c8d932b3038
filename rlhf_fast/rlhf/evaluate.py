"""Task score of a policy: sample one response per held-out prompt and average the hidden scorer."""
from __future__ import annotations

import torch

from .reward_fns import call_reward_fn
from .rollout import decode_rows, generate_chunk
from .runtime import Runtime

EVAL_SEED = 99_991  # fixed, so every evaluation of a run sees the same sampling noise


@torch.no_grad()
def task_score(policy, prompts: list[list[int]], prompt_len: int, tok, scorer, rt: Runtime, *, chunk: int,
               max_new_tokens: int, temperature: float, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               min_p: float = 0.0) -> float:
    """Mean of `scorer(prompt_texts, response_texts)` over `prompts`, sampled at `temperature`.

    Chunk j of `chunk` prompts runs on rank j % world with seed (seed, j), so the score does not depend
    on the number of ranks.
    """
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)
    n_chunks = -(-len(prompts) // chunk)
    # under FSDP every rank must generate as often (each forward is a collective): pad with filler calls
    slots = -(-n_chunks // rt.world) * rt.world if rt.mode == "fsdp" else n_chunks
    for j in range(rt.rank, slots, rt.world):
        start = (j if j < n_chunks else 0) * chunk
        seqs, _, mask, _ = generate_chunk(policy, prompts[start:start + chunk], prompt_len, tok,
                                          max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                          top_p=top_p, min_p=min_p, seed=EVAL_SEED + 1009 * seed + j,
                                          device=rt.device)
        if j >= n_chunks:  # a filler call, only there to keep the ranks in step
            continue
        scores = call_reward_fn(scorer, *decode_rows(tok, seqs, mask, prompt_len))
        total += torch.tensor([float(scores.sum()), float(len(scores))], dtype=torch.float64, device=rt.device)
    total = rt.all_reduce_sum(total)
    return float(total[0] / total[1])
