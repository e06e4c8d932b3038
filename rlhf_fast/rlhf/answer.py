"""What a trained policy answers to a prompt: `rlhf-fast sample RUN_DIR --prompt "..."`."""
from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint
from .config import build_config, load_file


def _stage_config(run_dir: Path, stage: str):
    for path in (run_dir / stage / "config.yaml", run_dir / stage / "config.json", run_dir / "config.yaml",
                 run_dir / "config.json"):
        if path.is_file():
            return build_config(None, None, base=load_file(path))
    raise ValueError(f"{run_dir} has no config.yaml (not a run directory?)")


@torch.no_grad()
def answer(run_dir, prompt: str, stage: str = "ppo", *, max_new_tokens: int | None = None, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0, device: str = "cpu") -> str:
    """The response of the policy trained by `stage` ('ppo', 'rl' or 'sft') of the run in `run_dir` to
    `prompt` (text, EOS and padding dropped). temperature 0 is greedy decoding. ValueError when the run has
    no such checkpoint. max_new_tokens: default the run's ppo.max_new_tokens (rl.max_new_tokens for rl)."""
    from .data import Line, tokenize_prompts
    from .rollout import decode_rows, generate_chunk
    from .run_dir import check_tokenizer
    from .runtime import load_model
    if stage not in ("ppo", "rl", "sft"):
        raise ValueError(f"--stage must be 'ppo', 'rl' or 'sft', got {stage!r}")
    run_dir = Path(run_dir)
    cfg = _stage_config(run_dir, stage)
    path = checkpoint.stage_checkpoint(run_dir / stage)
    if not path.is_file():
        raise ValueError(f"{run_dir} has no {stage} checkpoint ({path}); train the stage first")
    state = checkpoint.load(path)
    policy = load_model(state["model" if stage == "sft" else "policy"], torch.device(device)).eval()
    tok = check_tokenizer(cfg.run.tokenizer)
    default = cfg.rl.max_new_tokens if stage == "rl" else cfg.ppo.max_new_tokens
    new = default if max_new_tokens is None else max_new_tokens
    if new <= 0 or temperature < 0:
        raise ValueError(f"need max_new_tokens > 0 and temperature >= 0, got {new} and {temperature}")
    ids = tokenize_prompts([Line("--prompt", {"prompt": prompt})], tok, policy.config.block_size, new)
    seqs, _, mask, _ = generate_chunk(policy, ids, len(ids[0]), tok, max_new_tokens=new, temperature=temperature,
                                      top_k=top_k, top_p=top_p, seed=seed, device=torch.device(device))
    return decode_rows(tok, seqs.cpu(), mask.cpu(), len(ids[0]))[1][0]
