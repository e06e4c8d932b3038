"""Stage inits: a checkpoint of this pipeline or a Hugging Face folder (--model.init, --sft.init,
--rm.init, --ppo.policy_init, --ppo.reward_init), both read as the {config, head, weights} that
runtime.load_model rebuilds a model from.

``init_config`` checks an init without reading its weights (the run's preflight calls it before the run
directory is touched); ``init_model_state`` then loads it. Both apply the same head rule."""
from __future__ import annotations

from pathlib import Path

import torch


def is_hf_folder(path) -> bool:
    return bool(path) and Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _model_entry(state: dict, path) -> dict:
    """The model a checkpoint holds: "model" (sft, rm), or the PPO stage's "policy"."""
    model = state.get("model") or state.get("policy")
    if not model:
        raise ValueError(f"checkpoint {str(path)!r} holds no model (keys: {sorted(state)})")
    return model


def _check_head(path, has: str, head: str, need_head: bool, hf: bool) -> None:
    """A stage may start from another head's backbone (load_model swaps the head), except where it needs
    the head itself (need_head: PPO's policy and frozen reward model); an HF reward-model folder gives no
    causal-LM backbone (its loader reads *ForCausalLM folders only)."""
    if has == head or not (need_head or (hf and head == "lm")):
        return
    if head == "lm":
        want = "a policy (a *ForCausalLM folder, or an sft or ppo checkpoint)"
    else:
        want = "a reward model (a *ForSequenceClassification folder, or an rm checkpoint)"
    raise ValueError(f"{str(path)!r} holds a model with head {has!r}, expected {head!r}: give {want}")


def init_config(path, head: str = "lm", *, need_head: bool = False) -> tuple[dict, str]:
    """(GPTConfig as a dict, head) of the model a stage starting from `path` trains, checked as far as
    possible without reading weights: the path exists; a folder has a readable config.json whose
    model_type and fields the loader supports (its own mapping: an unsupported field is named), the
    tensors it names and the head the stage needs; a checkpoint file is whole and holds a model.
    ValueError (one line) otherwise."""
    from . import checkpoint
    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file():
        raise ValueError(f"{str(p)!r} is a folder without config.json (a Hugging Face model folder holds one)")
    if is_hf_folder(p):
        from ..model.hf import inspect_folder
        try:
            info = inspect_folder(p)
        except OSError as exc:
            raise ValueError(f"{str(p)!r}: {exc.strerror or exc}: {exc.filename}") from None
        has = "lm" if info.head == "lm" else "reward"
        _check_head(p, has, head, need_head, hf=True)
        return {**info.config.to_dict(), "score_bias": True}, has
    model = _model_entry(checkpoint.read_meta(p), p)
    _check_head(p, model["head"], head, need_head, hf=False)
    return model["config"], model["head"]


def init_model_state(path, head: str = "lm", *, backend: str = "auto", need_head: bool = False) -> dict:
    """A stage init: a checkpoint file (its model) or an HF folder, as {config, head, weights}.

    head: the head the stage wants; a *ForCausalLM folder still loads as "lm" (the stage swaps the head)
    unless need_head, which refuses any model whose head is not `head` (e.g. PPO's frozen reward model).
    backend: GPTConfig.backend of a model read from an HF folder (run.backend; checkpoints keep theirs).
    """
    if is_hf_folder(path):
        from ..model.hf import from_pretrained, inspect_folder
        has = "lm" if inspect_folder(path).head == "lm" else "reward"
        _check_head(path, has, head, need_head, hf=True)
        model = from_pretrained(path, head=has, dtype=torch.float32, backend=backend)
        weights = model.state_dict()
        if has != "lm":  # HF's score head has no bias; the pipeline's has one (reward normalization folds into it)
            weights["score.bias"] = torch.zeros(1)
        return {"config": {**model.config.to_dict(), "score_bias": True}, "head": model.head, "weights": weights}
    from .runtime import load_checkpoint
    state = _model_entry(load_checkpoint(path), path)
    _check_head(path, state["head"], head, need_head, hf=False)
    return state
