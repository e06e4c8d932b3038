"""Run configuration: ``Config`` gathers the sections (``sections.py``), dataclasses whose field
docstrings are the ``--help`` text.

A config is built from the defaults, then a YAML/JSON file (nested by section), then ``section.field=value``
overrides (the CLI's ``--ppo.kl_coef=0.05``). Unknown sections or fields and values of the wrong type
raise ``ValueError`` naming the field and what is allowed.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import re
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# the sections live in sections.py; importing them from here keeps working
from .sections import (DataConfig, LoRASection, ModelConfig, OptimConfig, PPOConfig, RLConfig,  # noqa: F401
                       RMConfig, RolloutConfig, RunConfig, SFTConfig, TaskConfig, TrainConfig)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRASection = field(default_factory=LoRASection)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}

_POSITIVE = {"steps", "batch_size", "rollout_batch_size", "gen_batch_size", "minibatch_size", "ppo_epochs",
             "lr", "value_lr", "max_new_tokens", "n_layer", "n_head", "n_embd", "block_size", "n_sft",
             "n_pairs", "n_eval_pairs", "n_prompts", "n_eval_prompts", "ckpt_every", "eval_every",
             "kl_horizon", "target_kl", "temperature", "group_size", "epochs", "grad_accum"}
_NONNEGATIVE = {"warmup_steps", "weight_decay", "grad_clip", "norm_samples", "kl_coef",
                "top_k", "missing_eos_penalty", "seed", "threads", "score_batch_size",
                "memory_limit_gib"}
_UNIT = {"demo_error_rate", "label_noise", "gamma", "lam"}


@functools.lru_cache(maxsize=None)
def field_help(cls) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body, or in a base dataclass's body
    (a subclass that only changes a field's default keeps the base's text)."""
    out = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                out[node.target.id] = nxt.value.value
    return out


def _convert(name: str, value, typ):
    """`value` (from YAML/JSON or a command-line string) as `typ`, or ValueError naming `name`."""
    if typing.get_origin(typ) is Literal:
        allowed = typing.get_args(typ)
        if value not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{name} must be a boolean (true/false), got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unsupported config type {typ} for {name}")


def _set(cfg: Config, key: str, value) -> None:
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        raise ValueError(f"unknown config key {key!r}: expected <section>.<field> with section in {list(SECTIONS)}")
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    if name not in hints:
        raise ValueError(f"unknown config field {key!r}; {section} has fields {sorted(hints)}")
    setattr(obj, name, _convert(key, value, hints[name]))


def validate(cfg: Config) -> Config:
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            v, key = getattr(obj, f.name), f"{section}.{f.name}"
            if f.name in _POSITIVE and not v > 0:
                raise ValueError(f"{key} must be > 0, got {v}")
            if f.name in _NONNEGATIVE and not v >= 0:
                raise ValueError(f"{key} must be >= 0, got {v}")
            if f.name in _UNIT and not 0 <= v <= 1:
                raise ValueError(f"{key} must be in [0, 1], got {v}")
    keys = [getattr(cfg.data, f"{k}_key") for k in ("prompt", "response", "chosen", "rejected")]
    if not all(keys) or len(set(keys)) < len(keys):
        raise ValueError(f"data.prompt_key, response_key, chosen_key and rejected_key must be non-empty and "
                         f"distinct, got {keys}")
    for section in ("ppo", "rl"):
        c = getattr(cfg, section)
        if not 0 < c.top_p <= 1:
            raise ValueError(f"{section}.top_p must be in (0, 1], got {c.top_p}")
        if not 0 <= c.min_p < 1:
            raise ValueError(f"{section}.min_p must be in [0, 1), got {c.min_p}")
    if cfg.ppo.minibatch_size > cfg.ppo.rollout_batch_size:
        raise ValueError(f"ppo.minibatch_size ({cfg.ppo.minibatch_size}) must be <= ppo.rollout_batch_size "
                         f"({cfg.ppo.rollout_batch_size})")
    for name in ("gen_batch_size", "minibatch_size"):
        if cfg.ppo.rollout_batch_size % getattr(cfg.ppo, name):
            raise ValueError(f"ppo.{name} ({getattr(cfg.ppo, name)}) must divide ppo.rollout_batch_size "
                             f"({cfg.ppo.rollout_batch_size})")
    if cfg.model.n_embd % cfg.model.n_head and not cfg.model.head_dim:
        raise ValueError(f"model.n_embd ({cfg.model.n_embd}) must be a multiple of model.n_head ({cfg.model.n_head}) "
                         "unless model.head_dim is set")
    if cfg.ppo.eval_prompts and not cfg.ppo.reward_fn:
        raise ValueError("ppo.eval_prompts needs ppo.reward_fn ('module:function') to score the held-out "
                         "responses")
    if cfg.ppo.reward_mode != "model" and not cfg.ppo.reward_fn:
        raise ValueError(f"ppo.reward_mode={cfg.ppo.reward_mode!r} needs ppo.reward_fn ('module:function')")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.run.device):
        raise ValueError(f"run.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.run.device!r}")
    validate_rl(cfg.rl)
    from .trackers import parse_report_to
    parse_report_to(cfg.run.report_to)
    if cfg.lora.r < 0 or not cfg.lora.alpha > 0 or not 0 <= cfg.lora.dropout < 1:
        raise ValueError(f"lora.r must be >= 0, lora.alpha > 0 and lora.dropout in [0, 1), got r={cfg.lora.r}, "
                         f"alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout}")
    from ..model.lora import TARGETS
    names = [t.strip() for t in cfg.lora.targets.split(",")]
    if cfg.lora.targets != "all" and (not all(names) or set(names) - set(TARGETS)):
        raise ValueError(f"lora.targets must be 'all' or comma-separated names from {list(TARGETS)}, "
                         f"got {cfg.lora.targets!r}")
    if cfg.task.min_digits > cfg.task.max_digits or cfg.task.min_digits < 2:
        raise ValueError(f"task.min_digits must be in [2, task.max_digits], got {cfg.task.min_digits}")
    return cfg


def load_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise ValueError(f"config file {path}:{line}: not UTF-8 text ({exc.reason})") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"config file {str(path)!r} is YAML, which needs PyYAML: "
                             "pip install 'rlhf_fast[train]' (or pass a .json file)") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"config file {where}: YAML syntax error ({what})") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path}:{exc.lineno}: JSON syntax error ({exc.msg})") from None
    else:
        raise ValueError(f"config file must end in .yaml, .yml or .json, got {str(path)!r}")
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def build_config(file: str | Path | None = None, overrides: dict[str, object] | None = None,
                 base: dict | None = None) -> Config:
    """Defaults <- `base` (a nested dict) <- `file` (nested) <- `overrides` ({"ppo.lr": "1e-5"}); validated."""
    cfg = Config()
    for nested in (base, load_file(file) if file else None):
        for section, values in (nested or {}).items():
            if section not in SECTIONS:
                raise ValueError(f"unknown config section {section!r}; allowed sections are {list(SECTIONS)}")
            if not isinstance(values, dict):
                raise ValueError(f"config section {section!r} must be a mapping of fields")
            for name, value in values.items():
                _set(cfg, f"{section}.{name}", value)
    for key, value in (overrides or {}).items():
        _set(cfg, key, value)
    return validate(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (JSON if PyYAML is missing), atomically."""
    from .run_io import atomic_write_json, atomic_write_text
    path = Path(path)
    try:
        import yaml
    except ImportError:
        atomic_write_json(cfg.to_dict(), path.with_suffix(".json"))
        return
    atomic_write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), path)


def validate_rl(c: RLConfig) -> None:
    """The rl section's constraints across fields (the per-field ranges are checked by name in validate)."""
    if c.group_size < 1 or (c.algo in ("grpo", "dr_grpo", "rloo") and c.group_size < 2):
        raise ValueError(f"rl.group_size must be >= 2 for rl.algo={c.algo!r} (>= 1 otherwise), got {c.group_size}")
    if c.clip_range <= 0 or c.clip_range_high < 0:
        raise ValueError(f"rl.clip_range must be > 0 and rl.clip_range_high >= 0, got {c.clip_range}, "
                         f"{c.clip_range_high}")
    if c.dual_clip != 0 and not c.dual_clip > 1:
        raise ValueError(f"rl.dual_clip must be 0 (off) or > 1, got {c.dual_clip}")
    if c.rollout_batch_size % c.gen_batch_size:
        raise ValueError(f"rl.gen_batch_size ({c.gen_batch_size}) must divide rl.rollout_batch_size "
                         f"({c.rollout_batch_size})")
    rows = c.rollout_batch_size * c.group_size
    if rows % c.minibatch_size:
        raise ValueError(f"rl.minibatch_size ({c.minibatch_size}) must divide rl.rollout_batch_size * "
                         f"rl.group_size ({rows})")
    if c.eval_prompts and c.prompts and not c.reward_fn:
        raise ValueError("rl.eval_prompts needs rl.reward_fn ('module:function') to score the held-out responses")
    if c.reward_weights and len(c.reward_weights.split(",")) != len(c.reward_fn.split(",")):
        raise ValueError(f"rl.reward_weights ({c.reward_weights!r}) needs one weight per rl.reward_fn "
                         f"({c.reward_fn!r})")
