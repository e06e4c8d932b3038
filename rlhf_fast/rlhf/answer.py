"""What a trained policy answers to a prompt: `rlhf-fast sample RUN_DIR --prompt "..."`."""
from __future__ import annotations

import torch


@torch.no_grad()
def answer(run_dir, prompt: str, stage: str = "ppo", *, max_new_tokens: int | None = None, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0, device: str = "cpu") -> str:
    """The response of the policy trained by `stage` ('ppo', 'rl' or 'sft') of the run in `run_dir` to
    `prompt` (text, EOS and padding dropped). temperature 0 is greedy decoding. ValueError when the run has
    no such checkpoint. max_new_tokens: default the run's ppo.max_new_tokens (rl.max_new_tokens for rl)."""
    from .data import Line, tokenize_prompts
    from .rollout import decode_rows, generate_chunk
    from .run_dir import check_tokenizer, trained_model
    from .runtime import load_model
    if stage not in ("ppo", "rl", "sft"):
        raise ValueError(f"--stage must be 'ppo', 'rl' or 'sft', got {stage!r}")
    cfg, state = trained_model(run_dir, stage, unfinished_ok=True)
    policy = load_model(state, torch.device(device)).eval()
    tok = check_tokenizer(cfg.run.tokenizer)
    default = cfg.rl.max_new_tokens if stage == "rl" else cfg.ppo.max_new_tokens
    new = default if max_new_tokens is None else max_new_tokens
    if new <= 0 or temperature < 0:
        raise ValueError(f"need max_new_tokens > 0 and temperature >= 0, got {new} and {temperature}")
    text = [{"role": "user", "content": prompt}] if cfg.data.chat_template else prompt
    ids = tokenize_prompts([Line("--prompt", {"prompt": text})], tok, policy.config.block_size, new)
    seqs, _, mask, _ = generate_chunk(policy, ids, len(ids[0]), tok, max_new_tokens=new, temperature=temperature,
                                      top_k=top_k, top_p=top_p, seed=seed, device=torch.device(device))
    return decode_rows(tok, seqs.cpu(), mask.cpu(), len(ids[0]))[1][0]
