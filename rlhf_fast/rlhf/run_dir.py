"""What a stage checks before it writes anything into its run directory, and how it then claims it.

``preflight`` validates all a stage can know before training (device, backend, distributed launch, thread
count, tokenizer, data files, reward function, the checkpoints it starts from, the state of the run
directory) and raises ``ValueError`` with one line naming the problem; it writes nothing, so a launch that
fails there leaves an existing run exactly as it was. ``claim`` then prepares the directory: stale temp
files removed, ``--overwrite`` carried out, the resolved config recorded, at the top (what ``--resume`` of
the whole run reads) and with the stage (``<stage>/config.yaml``, next to what it trained).

A stage is finished when ``<stage>/result.json`` exists (written last, with what the stage adds to
summary.json). A stage folder with a checkpoint or metrics is never replaced silently: rerunning it needs
``--resume`` (continue; a finished stage is skipped) or ``--overwrite`` (start again; the later stages,
built on it, go too: they wait in ``<out>/.replaced`` until the new stage finishes).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint
from .config import Config, build_config, load_file, save_config
from .reward_fns import load_function
from .run_io import atomic_write_json, remove_stale_temps

ORDER = ("sft", "rm", "ppo", "rl")  # each stage after those it can start from
RESULT = "result.json"
REPLACED = ".replaced"
# the model each stage trains, as its checkpoint names it
STAGE_MODEL = {"sft": "model", "rm": "model", "ppo": "policy", "rl": "policy"}


@dataclass
class Plan:
    cfg: Config  # the config the stage runs with (model architecture taken from its init checkpoint)
    out: Path
    stage: str
    resume: bool
    finished: bool  # resume of a finished stage: nothing to do
    remove: list[Path]  # what --overwrite removes: this stage's folder and the later stages'
    memory: str = ""  # the memory plan's table, printed when the stage starts ('' when not known yet)


def stage_results(stage_dir: Path) -> list[Path]:
    """The files that show a stage has run in `stage_dir` (checkpoint, metrics, result)."""
    names = (checkpoint.NAME, checkpoint.LEGACY_NAME, "metrics.jsonl", RESULT)
    return [stage_dir / n for n in names if (stage_dir / n).is_file()]


def is_finished(stage_dir: Path) -> bool:
    return (stage_dir / RESULT).is_file()


def recorded_config(run_dir: Path, stage: str) -> Config:
    """The config `stage` recorded (<stage>/config.yaml), else the run's last one; ValueError if neither."""
    for path in (run_dir / stage / "config.yaml", run_dir / stage / "config.json", run_dir / "config.yaml",
                 run_dir / "config.json"):
        if path.is_file():
            return build_config(None, None, base=load_file(path))
    raise ValueError(f"{run_dir} has no config.yaml (not a run directory?)")


def trained_model(run_dir, stage: str, *, unfinished_ok: bool = False) -> tuple[Config, dict]:
    """(the config `stage` recorded, the {config, head, weights} of the model it trained) of the run in
    `run_dir`. ValueError (one line) when the run has no such stage or, unless unfinished_ok, the stage has
    not finished (an older run's checkpoint.pt, from before stages recorded their end, counts as finished)."""
    run_dir = Path(run_dir)
    if stage not in STAGE_MODEL:
        raise ValueError(f"--stage must be one of {tuple(STAGE_MODEL)}, got {stage!r}")
    cfg = recorded_config(run_dir, stage)
    path = checkpoint.stage_checkpoint(run_dir / stage)
    if not path.is_file():
        raise ValueError(f"{run_dir} has no {stage} checkpoint ({path}): train the stage first "
                         f"(rlhf-fast {stage} --out {run_dir})")
    if not unfinished_ok and path.name == checkpoint.NAME and not is_finished(run_dir / stage):
        raise ValueError(f"the {stage} stage of {run_dir} is unfinished (no {RESULT}): finish it with "
                         f"`rlhf-fast {stage} --resume {run_dir}`")
    return cfg, checkpoint.load(path)[STAGE_MODEL[stage]]


def stage_init(value: str, out: Path, stage: str) -> str:
    """'sft' / 'rm' -> this run's checkpoint of that stage; anything else is a path."""
    return str(checkpoint.stage_checkpoint(out / stage)) if value == stage else value


def _inits(cfg: Config, out: Path, stage: str) -> list[tuple[str, str, str, str, bool]]:
    """(config key, checkpoint path or HF folder, earlier stage or '', head the stage wants, whether it
    needs exactly that head) of the models `stage` starts from; the first one's architecture is trained."""
    if stage == "sft":
        key = "sft.init" if cfg.sft.init else "model.init"
        return [(key, cfg.sft.init or cfg.model.init, "", "lm", False)] if cfg.sft.init or cfg.model.init else []
    if stage == "rm":
        made_by = "sft" if cfg.rm.init == "sft" else ""
        return [("rm.init", stage_init(cfg.rm.init, out, "sft"), made_by, "reward", False)] if cfg.rm.init else []
    if stage == "ppo":
        return [("ppo.policy_init", stage_init(cfg.ppo.policy_init, out, "sft"),
                 "sft" if cfg.ppo.policy_init == "sft" else "", "lm", True),
                ("ppo.reward_init", stage_init(cfg.ppo.reward_init, out, "rm"),
                 "rm" if cfg.ppo.reward_init == "rm" else "", "reward", True)]
    c = cfg.rl  # a reward model only scores own prompts that have no reward function
    uses_rm = bool(c.prompts and not c.reward_fn and c.reward_init)
    return [("rl.policy_init", stage_init(c.policy_init, out, "sft"), "sft" if c.policy_init == "sft" else "",
             "lm", True)] + \
        ([("rl.reward_init", stage_init(c.reward_init, out, "rm"), "rm" if c.reward_init == "rm" else "",
           "reward", True)] if uses_rm else [])


def _built_on(out: Path, stage: str) -> set[str]:
    """The stages of the run in `out` that its `stage` started from, as its recorded config says (every
    earlier stage when it has no readable record)."""
    record = next((p for p in (out / stage / "config.yaml", out / stage / "config.json") if p.is_file()), None)
    try:
        recorded = build_config(None, None, base=load_file(record))
    except (TypeError, ValueError):
        return set(ORDER[:ORDER.index(stage)])
    return {made_by for _, _, made_by, _, _ in _inits(recorded, out, stage) if made_by}


def built_on(out: Path, stage: str) -> list[str]:
    """`stage` and the stages of the run in `out` built on it, directly or through another: what
    --overwrite of `stage` sets aside."""
    found = [stage]
    for later in ORDER[ORDER.index(stage) + 1:]:
        if (out / later).exists() and _built_on(out, later) & set(found):
            found.append(later)
    return found



def adopt_architecture(cfg: Config, gpt_config: dict) -> Config:
    """`cfg` with the model section of the checkpoint or HF folder it starts from, so the recorded config
    says what was trained."""
    cfg = copy.deepcopy(cfg)
    cfg.model.take_architecture(gpt_config)
    return cfg


def _check_init(cfg: Config, key: str, path: str, head: str, need_head: bool, tok) -> dict:
    """The GPTConfig dict of the init `key` names, or ValueError naming `key`."""
    from .model_init import init_config
    try:
        config, has = init_config(path, head, need_head=need_head)
    except ValueError as exc:
        raise ValueError(f"{key}={path!r}: {exc}") from None
    if tok.vocab_size > config["vocab_size"]:
        raise ValueError(f"{key}={path!r}: its model has vocab_size {config['vocab_size']}, but run.tokenizer="
                         f"{cfg.run.tokenizer!r} has {tok.vocab_size} ids: use the tokenizer the model was "
                         "trained with")
    if key == "rm.init" and cfg.rm.norm_samples > 0 and has != "lm":
        raise ValueError(f"rm.init={path!r} holds a reward model, not a policy, but rm.norm_samples="
                         f"{cfg.rm.norm_samples} samples responses from rm.init's policy: set --rm.norm_samples=0")
    return config


def _check_writable(out: Path) -> None:
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"run.out={str(out)!r}: {str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"run.out={str(out)!r}: {str(parent)!r} is not writable (permission denied); "
                         "choose another --out")


def check_tokenizer(spec: str):
    """The tokenizer named by run.tokenizer, or ValueError saying what to install or fix."""
    from .tokenizer import get_tokenizer
    try:
        return get_tokenizer(spec)
    except ImportError as exc:
        package = "tiktoken" if spec.startswith("tiktoken:") else "transformers"
        raise ValueError(f"run.tokenizer={spec!r} needs the {package} package ({exc}): "
                         "pip install 'rlhf_fast[tokenizers]'") from None
    except (OSError, KeyError) as exc:
        raise ValueError(f"run.tokenizer={spec!r} cannot be loaded: {str(exc).splitlines()[0]}") from None


def read_data(path, keys, fmt: dict):
    """`read_jsonl(path, keys, **fmt)`, with a non-UTF-8 file reported as ValueError naming file and line."""
    from .data import read_jsonl
    try:
        return read_jsonl(path, keys, **fmt)
    except UnicodeDecodeError as exc:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"{path}:{lineno}: not UTF-8 text ({exc.reason}); data files must be "
                                     "UTF-8 encoded JSONL") from None
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _check_data(cfg: Config, stage: str, tok) -> None:
    from .data import PPO_KEYS, RM_KEYS, SFT_KEYS, data_format, tokenize_pairs, tokenize_prompts, tokenize_sft
    block, new = cfg.model.block_size, cfg.ppo.max_new_tokens
    files = {"sft": [(cfg.sft.data, SFT_KEYS, lambda ls: tokenize_sft(ls, tok, block))],
             "rm": [(p, RM_KEYS, lambda ls: tokenize_pairs(ls, tok, block)) for p in (cfg.rm.data, cfg.rm.eval_data)],
             "ppo": [(cfg.ppo.prompts, PPO_KEYS, lambda ls: tokenize_prompts(ls, tok, block, new))],
             "rl": [(p, PPO_KEYS, lambda ls: tokenize_prompts(ls, tok, block, cfg.rl.max_new_tokens))
                    for p in (cfg.rl.prompts, cfg.rl.eval_prompts)]}[stage]
    if cfg.ppo.eval_prompts and stage in ("sft", "ppo"):
        files.append((cfg.ppo.eval_prompts, PPO_KEYS, lambda ls: tokenize_prompts(ls, tok, block, new)))
    # the training file (the first) must fill one batch: the trainer's sampler refuses it later otherwise
    batch = {"sft": ("sft.batch_size", cfg.sft.batch_size), "rm": ("rm.batch_size", cfg.rm.batch_size),
             "ppo": ("ppo.rollout_batch_size", cfg.ppo.rollout_batch_size),
             "rl": ("rl.rollout_batch_size", cfg.rl.rollout_batch_size)}[stage]
    for i, (path, keys, tokenize) in enumerate(files):
        if path:
            n = len(tokenize(read_data(path, keys, data_format(cfg, path))))
            if i == 0 and batch[1] > n:
                raise ValueError(f"{batch[0]}={batch[1]} is larger than {path} ({n} examples): lower it or "
                                 "add data")


def _check_rewards(cfg: Config, stage: str) -> None:
    """The reward functions `stage` calls import and are callable (ValueError naming the config key)."""
    if cfg.ppo.reward_fn and stage == "ppo" or (cfg.ppo.eval_prompts and stage in ("sft", "ppo")):
        load_function(cfg.ppo.reward_fn, "ppo.reward_fn")
    if stage == "rl":
        from .reward_fns import rl_rewards
        rl_rewards(cfg.rl)


def preflight(cfg: Config, stage: str, resume: bool, overwrite: bool, earlier: tuple[str, ...] = ()) -> Plan:
    """Check everything `stage` needs before it touches `cfg.run.out`; ValueError with one line if anything
    is wrong. `earlier`: stages that run before this one in the same command (their checkpoints will exist).
    """
    from .runtime import check_runtime
    if resume and overwrite:
        raise ValueError("--resume continues a run and --overwrite starts it again: pass one of them")
    out = Path(cfg.run.out)
    device, mode, world = check_runtime(cfg)
    if stage == "rl" and mode == "fsdp":
        raise ValueError(f"rl.algo={cfg.rl.algo!r} runs with run.distributed 'none' or 'ddp', not 'fsdp'")
    _check_writable(out)
    stage_dir = out / stage
    finished = resume and is_finished(stage_dir)
    if not resume and not overwrite and stage_results(stage_dir):
        what = "a finished" if is_finished(stage_dir) else "an unfinished"
        hint = "" if is_finished(stage_dir) else f"continue it with --resume {out}, or "
        raise ValueError(f"{stage_dir} already holds {what} {stage} stage; {hint}pass --overwrite to replace it "
                         "(and the later stages built on it), or choose a new --out")
    if finished:
        return Plan(cfg, out, stage, resume, True, [])
    tok = check_tokenizer(cfg.run.tokenizer)
    from .trackers import check_installed
    check_installed(cfg.run.report_to)
    _check_rewards(cfg, stage)
    inits = []  # GPTConfig dicts of the inits (None: made by an earlier stage of this command)
    for i, (key, path, made_by, head, need_head) in enumerate(_inits(cfg, out, stage)):
        inits.append(None)
        if made_by in earlier:
            continue
        if made_by and not Path(path).is_file():
            raise ValueError(f"{key}={made_by!r} needs this run's {made_by} stage, but {path} does not exist: "
                             f"run `rlhf-fast {made_by} --out {out}` first, or give {key} a checkpoint path")
        if made_by == "" and not Path(path).exists():
            raise ValueError(f"{key}={path!r} does not exist (a checkpoint file or a Hugging Face model folder)")
        config = _check_init(cfg, key, path, head, need_head, tok)
        inits[-1] = config
        if i == 0:  # the model the stage trains (PPO: the policy)
            cfg = adopt_architecture(cfg, config)
    _check_data(cfg, stage, tok)
    from .microbatch import check_stage_accum
    check_stage_accum(cfg, stage, world)
    from .memory_plan import preflight_plan
    memory = preflight_plan(cfg, stage, inits, tok.vocab_size, world, device, mode)  # stops here if it cannot fit
    if resume:
        own = checkpoint.stage_checkpoint(stage_dir)
        if own.is_file():
            checkpoint.read_meta(own)
    later = built_on(out, stage) if overwrite else ()
    return Plan(cfg, out, stage, resume, False, [out / s for s in later if (out / s).exists()], memory)


def preflight_stages(cfg: Config, stages: tuple[str, ...], resume: bool, overwrite: bool) -> bool:
    """`preflight` of each of `stages`, which one command runs in this order, before the first starts.
    Returns whether anything is left to run (False: --resume of a run whose stages all finished)."""
    for i, stage in enumerate(stages):
        preflight(cfg, stage, resume, overwrite, earlier=stages[:i])
    return not (resume and all(is_finished(Path(cfg.run.out) / stage) for stage in stages))


def _set_aside(plan: Plan) -> None:
    """--overwrite: move the stage's folder and the later stages' to <out>/.replaced, where they stay until
    the new stage finishes, so a new attempt that fails (a NaN at step 1) loses nothing. A stage already in
    .replaced (the last --overwrite never finished) keeps the results there, and its folder in the run,
    made by the failed attempt, is deleted instead."""
    out, aside = plan.out, plan.out / REPLACED
    print(f"rlhf-fast {plan.stage}: --overwrite: moving aside to {aside} (deleted when {plan.stage} finishes): "
          f"{', '.join(str(p) for p in plan.remove)}", flush=True)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    aside.mkdir(exist_ok=True)
    for d in plan.remove:
        if summary is not None and (d / RESULT).is_file():
            for key in json.loads((d / RESULT).read_text()):
                summary.pop(key, None)
        if (aside / d.name).exists():
            shutil.rmtree(d)
        else:
            d.rename(aside / d.name)
    if summary is not None:
        summary.pop("seconds", None)  # the whole demo's time no longer describes the run
        atomic_write_json(summary, summary_path)
    (out / "demo.png").unlink(missing_ok=True)


def claim(plan: Plan, is_main: bool) -> None:
    """Prepare the run directory for the stage of `plan` (main rank only): stale temp files, --overwrite,
    the recorded configs. Prints one line for what --overwrite removes."""
    if not is_main:
        return
    out, stage_dir = plan.out, plan.out / plan.stage
    if plan.remove:
        _set_aside(plan)
    stage_dir.mkdir(parents=True, exist_ok=True)
    for d in (out, stage_dir, out / "data", stage_dir / "plots"):
        remove_stale_temps(d)
    save_config(plan.cfg, out / "config.yaml")
    save_config(plan.cfg, stage_dir / "config.yaml")


def finish(plan: Plan, is_main: bool, result: dict) -> None:
    """Mark the stage finished, with the values it added to summary.json; what --overwrite set aside goes."""
    if is_main:
        atomic_write_json(result, plan.out / plan.stage / RESULT)
        shutil.rmtree(plan.out / REPLACED, ignore_errors=True)
