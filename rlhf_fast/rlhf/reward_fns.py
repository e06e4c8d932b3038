"""Verifiable rewards: Python functions of the prompt, the response and the prompt's other JSONL fields.

Contract (as trl and OpenRLHF pass dataset columns): ``fn(prompts, responses, **fields)`` where every
field of a prompt's JSONL line other than "prompt" arrives as a keyword list aligned with the responses
(``{"prompt": "...", "answer": "42"}`` -> ``fn(prompts, responses, answer=[...])``; a line without the
field gives None there). It returns one number per response (a list, or a 1-D tensor or array), or None
for a response it cannot score: that response is left out of its group's baseline (advantage 0) and
counted as ``unscored``. Several functions combine as a weighted sum (``rl.reward_fn=a:f,b:g``,
``rl.reward_weights=1,0.5``); a response any of them cannot score is unscored. NaN, inf, or anything else
raise ValueError naming the function and what it returned (``call_reward_fn``, which also checks the
scores of ppo.reward_fn).
"""
from __future__ import annotations

import importlib
import json
import math
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


def _fn_name(fn) -> str:
    return f"{getattr(fn, '__module__', None) or '?'}:{getattr(fn, '__qualname__', None) or repr(fn)}"


def _is_number(v) -> bool:
    """A real number: int, float, or a 0-d numeric tensor / numpy scalar (bools and strings are not)."""
    if isinstance(v, (bool, str, bytes)):
        return False
    if isinstance(v, (int, float)):
        return True
    dtype = str(getattr(v, "dtype", "bool"))
    return getattr(v, "ndim", 1) == 0 and "bool" not in dtype and "complex" not in dtype and (
        "int" in dtype or "float" in dtype)


def call_reward_fn(fn, prompts: list[str], responses: list[str], *, allow_none: bool = False,
                   **fields) -> torch.Tensor:
    """(n,) float64 scores of `fn(prompts, responses, **fields)`, which must return one real number per
    response (a list/tuple of numbers or a 1-D tensor/array of n values); anything else raises ValueError
    naming `fn` and what it returned. Without `allow_none`, non-finite numbers pass: the NaN guard reports
    them with their step. With it, None (a response `fn` cannot score) becomes NaN, so a NaN or inf that
    `fn` returns is an error."""
    n = len(responses)
    out = fn(prompts, responses, **fields)
    expected = (f"it must return {n} numbers, one per response (a list or a 1-D tensor)"
                + (", or None for a response it cannot score" if allow_none else ""))
    if isinstance(out, torch.Tensor) or (hasattr(out, "shape") and hasattr(out, "dtype")):  # numpy too
        try:
            t = torch.as_tensor(out)
        except TypeError:
            raise ValueError(f"reward function {_fn_name(fn)} returned an array of {out.dtype}; {expected}") from None
        if t.dim() != 1 or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"reward function {_fn_name(fn)} returned a {tuple(t.shape)} {t.dtype} tensor; "
                             f"{expected}")
        values = t.detach().double().cpu()
    elif isinstance(out, (list, tuple)):
        bad = next((v for v in out if not (_is_number(v) or (allow_none and v is None))), None)
        if bad is not None:
            raise ValueError(f"reward function {_fn_name(fn)} returned a {type(out).__name__} holding "
                             f"{bad!r} ({type(bad).__name__}); {expected}")
        values = torch.tensor([math.nan if v is None else float(v) for v in out], dtype=torch.float64)
    else:
        shown = repr(out) if len(repr(out)) < 60 else repr(out)[:57] + "..."
        raise ValueError(f"reward function {_fn_name(fn)} returned {shown} ({type(out).__name__}); {expected}")
    if values.numel() != n:
        raise ValueError(f"reward function {_fn_name(fn)} returned {values.numel()} values for {n} responses; "
                         f"{expected}")
    if allow_none:  # NaN stands for None: a non-finite number from `fn` must not pass for "cannot score"
        given = out if isinstance(out, (list, tuple)) else values.tolist()
        bad = next((i for i, v in enumerate(given) if v is not None and not math.isfinite(float(v))), None)
        if bad is not None:
            raise ValueError(f"reward function {_fn_name(fn)} returned {float(given[bad])!r} for response {bad}; "
                             "expected a finite number, or None when it cannot score the response")
    return values


class RewardFunctions:
    """The weighted sum of reward functions; call with texts and per-response field dicts."""

    def __init__(self, specs: str, weights: str = ""):
        names = [s for s in specs.split(",") if s.strip()]
        if not names:
            raise ValueError("rl.reward_fn is empty: expected 'module:function[,module:function...]'")
        self.fns = [load_function(name) for name in names]
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
        for fn, w in zip(self.fns, self.weights):
            total += w * call_reward_fn(fn, list(prompts), list(responses), allow_none=True, **kwargs)
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
