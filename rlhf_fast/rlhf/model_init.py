"""Stage inits: a checkpoint of this pipeline or a Hugging Face folder (--model.init, --sft.init,
--rm.init, --ppo.policy_init, --ppo.reward_init), both read as the {config, head, weights} that
runtime.load_model rebuilds a model from."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def is_hf_folder(path) -> bool:
    return bool(path) and Path(path).is_dir() and (Path(path) / "config.json").is_file()


def init_model_state(path, head: str = "lm", *, backend: str = "auto", need_head: bool = False) -> dict:
    """A stage init: a checkpoint file (its "model" entry) or an HF folder, as {config, head, weights}.

    head: the head the stage wants; a *ForCausalLM folder still loads as "lm" (the stage swaps the head)
    unless need_head, which refuses any model whose head is not `head` (e.g. PPO's frozen reward model).
    backend: GPTConfig.backend of a model read from an HF folder (run.backend; checkpoints keep theirs).
    """
    if is_hf_folder(path):
        from ..model import GPT
        archs = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
        score = any(a.endswith("ForSequenceClassification") for a in archs)
        # a *ForCausalLM folder gives the backbone to any head (load_model swaps the head in)
        model = GPT.from_pretrained(path, head=head if score else "lm", dtype=torch.float32, backend=backend)
        weights = model.state_dict()
        if score:  # HF's score head has no bias; the pipeline's has one (reward normalization folds into it)
            weights["score.bias"] = torch.zeros(1)
        config = {**model.config.to_dict(), "score_bias": True}
        state = {"config": config, "head": model.head, "weights": weights}
    else:
        from .runtime import load_checkpoint
        state = load_checkpoint(path)["model"]
    if need_head and state["head"] != head:
        raise ValueError(f"{str(path)!r} holds a model with head {state['head']!r}, expected {head!r} (a "
                         f"{'reward-model checkpoint or *ForSequenceClassification folder' if head != 'lm' else 'policy'})")
    return state
