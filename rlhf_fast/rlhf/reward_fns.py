"""Verifiable rewards: Python functions of the prompt, the response and the prompt's other JSONL fields.

Contract (as trl and OpenRLHF pass dataset columns): ``fn(prompts, responses, **fields)`` where every
field of a prompt's JSONL line other than "prompt" arrives as a keyword list aligned with the responses
(``{"prompt": "...", "answer": "42"}`` -> ``fn(prompts, responses, answer=[...])``; a line without the
field gives None there). It returns one float per response, or None for a response it cannot score:
that response is left out of its group's baseline (advantage 0) and counted as ``unscored``. Several
functions combine as a weighted sum (``rl.reward_fn=a:f,b:g``, ``rl.reward_weights=1,0.5``); a
response any of them cannot score is unscored. NaN, inf, or a list of the wrong length raise ValueError.
"""
from __future__ import annotations

import importlib
import json
import numbers
import os
import sys
from pathlib import Path

import torch

from .data import PPO_KEYS, read_jsonl


def load_function(spec: str, key: str = "rl.reward_fn"):
    """The callable named by 'module:function'; ValueError naming the config `key` if it cannot be had.
    The working directory is on the import path, as with `python -m`, so a module next to where the
    command runs is found."""
    module, _, name = spec.strip().partition(":")
    if not module or not name:
        raise ValueError(f"{key} must be 'module:function', got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{key}={spec!r} cannot be loaded: {exc}") from None
    except Exception as exc:  # the module itself failed while importing
        raise ValueError(f"{key}={spec!r}: importing {module!r} raised {type(exc).__name__}: {exc}") from None
    if not callable(fn):
        raise ValueError(f"{key}={spec!r} is not callable (it is a {type(fn).__name__})")
    return fn


class RewardFunctions:
    """The weighted sum of reward functions; call with texts and per-response field dicts."""

    def __init__(self, specs: str, weights: str = ""):
        names = [s for s in specs.split(",") if s.strip()]
        if not names:
            raise ValueError("rl.reward_fn is empty: expected 'module:function[,module:function...]'")
        self.fns = [(name.strip(), load_function(name)) for name in names]
        try:
            self.weights = [float(w) for w in weights.split(",")] if weights else [1.0] * len(names)
        except ValueError:
            raise ValueError(f"rl.reward_weights must be comma-separated numbers, got {weights!r}") from None
        if len(self.weights) != len(self.fns):
            raise ValueError(f"rl.reward_weights has {len(self.weights)} weights for {len(self.fns)} reward_fn")

    def __call__(self, prompts: list[str], responses: list[str], fields: list[dict]) -> torch.Tensor:
        """(B,) float64 weighted rewards, NaN where some function returned None."""
        keys = sorted({k for f in fields for k in f if k != "prompt"})
        kwargs = {k: [f.get(k) for f in fields] for k in keys}
        total = torch.zeros(len(responses), dtype=torch.float64)
        for (name, fn), w in zip(self.fns, self.weights):
            out = fn(list(prompts), list(responses), **kwargs)
            if not hasattr(out, "__len__") or len(out) != len(responses):
                raise ValueError(f"reward function {name} returned {type(out).__name__} "
                                 f"{'of length ' + str(len(out)) if hasattr(out, '__len__') else ''}; "
                                 f"expected one float or None per response ({len(responses)})")
            for i, v in enumerate(out):
                if v is None:
                    total[i] = float("nan")
                    continue
                if not isinstance(v, numbers.Real) or not torch.isfinite(torch.tensor(float(v))):
                    raise ValueError(f"reward function {name} returned {v!r} for response {i}; expected a finite "
                                     "float, or None when it cannot score the response")
                total[i] += w * float(v)
        return total


BUILTIN_REWARD = "rlhf_fast.rlhf.task:answer_reward"


def rl_rewards(c) -> RewardFunctions | None:
    """The reward functions of the rl section `c`: rl.reward_fn, else the built-in task's answer check
    when it trains on the built-in task's prompts; None when a reward model (rl.reward_init) scores."""
    spec = c.reward_fn or ("" if c.prompts else BUILTIN_REWARD)
    if spec:
        return RewardFunctions(spec, c.reward_weights)
    if not c.reward_init:
        raise ValueError("rl: own prompts need rl.reward_fn ('module:function') or rl.reward_init (a reward model)")
    return None


def read_prompt_records(path: str | Path) -> list[dict]:
    """Every JSONL line of a prompts file as a dict of all its fields (validated as ``read_jsonl`` does)."""
    lines = read_jsonl(path, PPO_KEYS)
    with Path(path).open(encoding="utf-8") as f:
        records = [json.loads(raw) for raw in f if raw.strip()]
    assert len(records) == len(lines)
    return records
