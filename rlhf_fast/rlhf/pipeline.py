"""The stages as functions of a Config: ``run_sft``, ``run_rm``, ``run_ppo`` and ``run_demo`` (all three).

Run directory layout (``cfg.run.out``)::

    config.yaml            resolved config of the last stage started (``demo --resume`` reads it back)
    summary.json           task_score_sft, rm_accuracy, task_score_ppo, kl_final, seconds, ...
    demo.png               (demo) task score, reward and KL over the PPO iterations
    data/*.jsonl           the built-in task's data (when a data path is left empty)
    sft/ rm/ ppo/ rl/      per stage (rl/: the critic-free stage of ``rl_pipeline``): config.yaml (what it
                           trained, ``<stage> --resume`` reads it back), metrics.jsonl (one line per step),
                           checkpoint.safetensors, plots/*.png, result.json (written last: finished)
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .config import Config
from .data import PPO_KEYS, data_format, read_jsonl, tokenize_prompts
from .run_io import atomic_write_json, plot_metrics, remove_stale_temps
from .checkpoint import stage_checkpoint
from .model_init import init_model_state
from .reward_fns import load_function
from .run_dir import Plan, claim, finish, preflight, preflight_stages, stage_init
from .lora_stage import apply_run_lora, reference_policy, value_on_reward_backbone
from .memory_switches import frozen, trained
from .runtime import Runtime, load_checkpoint, load_model, setup_runtime, wrap_model
from .task import task_reward, write_task_data
from .tokenizer import get_tokenizer

PLOT_KEYS = {
    "sft": ["loss"],
    "rm": ["loss", "train_accuracy", "eval_accuracy"],
    "ppo": ["score", "kl", "task_score", "pg_loss", "vf_loss", "entropy", "approx_kl", "clipfrac", "explained_var"],
    "rl": ["reward_mean", "task_score", "kl", "pg_loss", "entropy", "clipfrac", "groups_all_equal", "response_len"],
}


def _begin(cfg: Config, stage: str, resume: bool, overwrite: bool) -> tuple[Plan, Runtime | None]:
    """Validate (nothing written if that fails), then claim the run directory for `stage`.
    (plan, None) for a finished stage that --resume has nothing left to do in."""
    plan = preflight(cfg, stage, resume, overwrite)
    if plan.finished:
        print(f"rlhf-fast {stage}: {plan.out / stage} is finished; nothing to resume", flush=True)
        if int(os.environ.get("RANK", "0")) == 0:
            for d in (plan.out, plan.out / stage):
                remove_stale_temps(d)
        return plan, None
    rt = setup_runtime(plan.cfg)
    if rt.is_main and plan.memory:
        print(plan.memory, flush=True)
    claim(plan, rt.is_main)
    rt.barrier()
    return plan, rt


def _read_summary(out: Path) -> dict:
    path = out / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _finish(plan: Plan, rt: Runtime, **values) -> dict:
    """Add the stage's values to summary.json, then mark the stage finished."""
    summary = _update_summary(plan.out, rt, **values)
    finish(plan, rt.is_main, values)
    return summary


def _task_data(cfg: Config, rt: Runtime, out: Path) -> dict[str, Path]:
    """Paths of the built-in task's data under out/data, written once (by the main rank)."""
    data = out / "data"
    t = cfg.task
    if rt.is_main and not (data / "eval_prompts.jsonl").is_file():
        write_task_data(data, seed=cfg.run.seed, min_digits=t.min_digits, max_digits=t.max_digits, n_sft=t.n_sft,
                        n_pairs=t.n_pairs, n_eval_pairs=t.n_eval_pairs, n_prompts=t.n_prompts,
                        n_eval_prompts=t.n_eval_prompts, demo_error_rate=t.demo_error_rate, label_noise=t.label_noise)
    rt.barrier()
    return {k: data / f"{k}.jsonl" for k in ("sft", "rm_train", "rm_eval", "prompts", "eval_prompts")}


def _update_summary(out: Path, rt: Runtime, **values) -> dict:
    summary = _read_summary(out)
    summary.update(values)
    if rt.is_main:
        atomic_write_json(summary, out / "summary.json")
    return summary


def _plots(cfg: Config, stage_dir: Path, stage: str, rt: Runtime) -> None:
    metrics = stage_dir / "metrics.jsonl"
    if not cfg.run.plots or not rt.is_main or not metrics.is_file():
        return
    present = {k for line in metrics.read_text().splitlines() if line.strip() for k in json.loads(line)}
    keys = [k for k in PLOT_KEYS[stage] if k in present]
    try:
        plot_metrics(metrics, stage_dir / "plots", keys=keys)
    except ImportError as exc:
        print(f"rlhf-fast: no plots ({exc})")


def _prompts(path, tok, cfg) -> list[list[int]]:
    lines = read_jsonl(path, PPO_KEYS, **data_format(cfg, path))
    return tokenize_prompts(lines, tok, cfg.model.block_size, cfg.ppo.max_new_tokens)


def _eval_fn(cfg: Config, rt: Runtime, tok, policy, eval_prompts, prompt_len: int, scorer):
    from .evaluate import task_score
    if scorer is None:
        return None
    c = cfg.ppo
    return lambda step: task_score(policy, eval_prompts, prompt_len, tok, scorer, rt, chunk=c.gen_batch_size,
                                   max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k,
                                   top_p=c.top_p, min_p=c.min_p, seed=cfg.run.seed)


def _builtin(cfg: Config, rt: Runtime, out: Path, name: str) -> Path:
    return _task_data(cfg, rt, out)[name]


def _evaluation(cfg: Config, rt: Runtime, out: Path, builtin_task: bool):
    """(held-out prompts file, scorer) for the task score, or (None, None).

    ppo.eval_prompts set: those prompts, scored by ppo.reward_fn (the config requires one). Otherwise, when
    the stage trains on the built-in task: its held-out prompts and hidden scorer.
    """
    if cfg.ppo.eval_prompts:
        return Path(cfg.ppo.eval_prompts), load_function(cfg.ppo.reward_fn, "ppo.reward_fn")
    if builtin_task:
        return _builtin(cfg, rt, out, "eval_prompts"), task_reward
    return None, None


def _policy_eval(cfg, rt, tok, out, policy, builtin_task: bool) -> float | None:
    """Task score of `policy` on the held-out prompts (None when there are none to score)."""
    path, scorer = _evaluation(cfg, rt, out, builtin_task)
    if path is None:
        return None
    eval_prompts = _prompts(path, tok, cfg)
    return _eval_fn(cfg, rt, tok, policy, eval_prompts, max(map(len, eval_prompts)), scorer)(0)


def run_sft(cfg: Config, resume: bool = False, on_step=None, overwrite: bool = False) -> dict:
    """SFT into cfg.run.out/sft. resume: continue it (a finished stage is left as it is); overwrite: start
    it again, removing its results and the later stages'. Neither, into a stage that has run: ValueError."""
    from .sft import train_sft
    t0 = time.time()
    plan, rt = _begin(cfg, "sft", resume, overwrite)
    if rt is None:
        return _read_summary(plan.out)
    cfg, out, tok = plan.cfg, plan.out, get_tokenizer(plan.cfg.run.tokenizer)
    data = cfg.sft.data or _builtin(cfg, rt, out, "sft")
    result = train_sft(cfg, rt, tok, data, out / "sft", resume, on_step=on_step)
    _plots(cfg, out / "sft", "sft", rt)
    policy = load_model(load_checkpoint(stage_checkpoint(out / "sft"))["model"], rt.device).eval()
    score = _policy_eval(cfg, rt, tok, out, policy, builtin_task=not cfg.sft.data)
    return _finish(plan, rt, world_size=rt.world, task_score_sft=score, sft_loss=result["loss"],
                   seconds_sft=time.time() - t0)


def run_rm(cfg: Config, resume: bool = False, on_step=None, overwrite: bool = False) -> dict:
    """The reward model into cfg.run.out/rm; resume and overwrite as in `run_sft`."""
    from .reward import train_rm
    t0 = time.time()
    plan, rt = _begin(cfg, "rm", resume, overwrite)
    if rt is None:
        return _read_summary(plan.out)
    cfg, out, tok = plan.cfg, plan.out, get_tokenizer(plan.cfg.run.tokenizer)
    train = cfg.rm.data or _builtin(cfg, rt, out, "rm_train")
    init = stage_init(cfg.rm.init, out, "sft")
    norm = None
    if init and cfg.rm.norm_samples > 0:  # SFT samples on the training pairs' prompts
        norm = lambda: _sft_samples(cfg, rt, tok, init, train)  # noqa: E731
    result = train_rm(cfg, rt, tok, train, cfg.rm.eval_data or _builtin(cfg, rt, out, "rm_eval"),
                      init, out / "rm", resume, norm_sequences=norm, on_step=on_step)
    _plots(cfg, out / "rm", "rm", rt)
    return _finish(plan, rt, **result, seconds_rm=time.time() - t0)


@torch.no_grad()
def _sft_samples(cfg: Config, rt: Runtime, tok, policy_ckpt: str, pairs_path) -> list[list[int]]:
    """cfg.rm.norm_samples full sequences [BOS] prompt response sampled from the SFT policy on the
    prompts of the preference pairs."""
    from .rollout import generate_chunk
    policy = load_model(init_model_state(policy_ckpt, backend=cfg.run.backend), rt.device, head="lm").eval()
    lines = read_jsonl(pairs_path, PPO_KEYS, **data_format(cfg, pairs_path))[:cfg.rm.norm_samples]
    prompts = tokenize_prompts(lines, tok, cfg.model.block_size, cfg.ppo.max_new_tokens)
    width = max(map(len, prompts))
    seqs = []
    for j, start in enumerate(range(0, len(prompts), cfg.ppo.gen_batch_size)):
        chunk = prompts[start:start + cfg.ppo.gen_batch_size]
        s, amask, _, _ = generate_chunk(policy, chunk, width, tok, max_new_tokens=cfg.ppo.max_new_tokens,
                                        temperature=cfg.ppo.temperature, top_k=cfg.ppo.top_k, top_p=cfg.ppo.top_p,
                                        min_p=cfg.ppo.min_p,
                                        seed=cfg.run.seed * 7919 + j, device=rt.device)
        seqs += [row[m.bool()].tolist() for row, m in zip(s.cpu(), amask.cpu())]
    return seqs


def run_ppo(cfg: Config, resume: bool = False, on_step=None, overwrite: bool = False) -> dict:
    """PPO into cfg.run.out/ppo; resume and overwrite as in `run_sft`."""
    from .ppo import train_ppo
    t0 = time.time()
    plan, rt = _begin(cfg, "ppo", resume, overwrite)
    if rt is None:
        return _read_summary(plan.out)
    cfg, out, tok = plan.cfg, plan.out, get_tokenizer(plan.cfg.run.tokenizer)
    prompts = _prompts(cfg.ppo.prompts or _builtin(cfg, rt, out, "prompts"), tok, cfg)
    eval_path, scorer = _evaluation(cfg, rt, out, builtin_task=not cfg.ppo.prompts)
    eval_prompts = _prompts(eval_path, tok, cfg) if eval_path is not None else []
    prompt_len = max(map(len, prompts + eval_prompts))
    sft_state = init_model_state(stage_init(cfg.ppo.policy_init, out, "sft"), need_head=True,
                                 backend=cfg.run.backend)
    rm_state = init_model_state(stage_init(cfg.ppo.reward_init, out, "rm"), head="reward", need_head=True,
                                backend=cfg.run.backend)
    ckpt = stage_checkpoint(out / "ppo")
    state = load_checkpoint(ckpt) if resume and ckpt.is_file() else None
    reward = load_model(rm_state, rt.device, merge=True).eval()  # a LoRA reward model: its adapters folded in
    shared = cfg.lora.r > 0 and rt.mode != "fsdp"  # LoRA: the value model is adapters on the reward's backbone
    if state is not None:
        policy = load_model(state["policy"], rt.device)
        if shared:
            value, reward = value_on_reward_backbone(cfg, reward, state["value"])
        else:
            value = load_model(state["value"], rt.device)
    else:
        policy = apply_run_lora(cfg, load_model(sft_state, rt.device, merge=True))
        if shared:
            value, reward = value_on_reward_backbone(cfg, reward)
        else:
            value = load_model(rm_state, rt.device, head="value")  # critic initialized from the reward model
            value.score.load_state_dict(reward.score.state_dict())
    policy, value = trained(cfg, policy), trained(cfg, value)
    ref = frozen(cfg, reference_policy(cfg, policy, sft_state, rt.device))  # LoRA: the policy, adapters off
    reward = frozen(cfg, reward)
    del sft_state, rm_state  # the host copies of the weights: every model now holds its own
    models = {"policy": wrap_model(policy, rt), "value": wrap_model(value, rt), "ref": ref, "reward": reward}
    reward_fn = load_function(cfg.ppo.reward_fn, "ppo.reward_fn") if cfg.ppo.reward_fn else None
    eval_fn = _eval_fn(cfg, rt, tok, policy, eval_prompts, prompt_len, scorer) if eval_prompts else None
    record = train_ppo(cfg, rt, tok, models, prompts, prompt_len, out / "ppo", state, eval_fn=eval_fn,
                       reward_fn=reward_fn, scorer=scorer, on_step=on_step)
    _plots(cfg, out / "ppo", "ppo", rt)
    return _finish(plan, rt, task_score_ppo=record.get("task_score"), kl_final=record.get("kl"),
                   score_final=record.get("score"), seconds_ppo=time.time() - t0)


def summary_plot(out: Path) -> Path | None:
    """out/demo.png: PPO's task score (step 0 = the SFT policy), reward-model score and KL per iteration."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    records = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig = Figure(figsize=(12, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    panels = (("task_score", "task score (held-out, sampled)"), ("score", "reward-model score (normalized)"),
              ("kl", "KL to the SFT policy (nats / response)"))
    for i, (key, title) in enumerate(panels):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax = fig.add_subplot(1, 3, i + 1)
        if key == "task_score":
            rollout = [(r["step"], r["task_score_rollout"]) for r in records if "task_score_rollout" in r]
            ax.plot([p[0] for p in rollout], [p[1] for p in rollout], alpha=0.35, label="rollout batch")
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if key == "task_score" else None,
                label="held-out prompts" if key == "task_score" else None)
        if key == "task_score":
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "demo.png"
    fig.savefig(path)
    return path


def run_demo(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """SFT -> reward model -> PPO on the built-in task; summary.json gets the total `seconds` (left as it is
    when --resume finds every stage finished). All three stages are checked before the first starts.
    With rl.algo other than 'ppo': SFT -> that critic-free algorithm (``rl_pipeline.run_rl_demo``)."""
    if cfg.rl.algo != "ppo":
        from .rl_pipeline import run_rl_demo
        return run_rl_demo(cfg, resume, overwrite)
    t0 = time.time()
    out = Path(cfg.run.out)
    ran = preflight_stages(cfg, ("sft", "rm", "ppo"), resume, overwrite)
    run_sft(cfg, resume, overwrite=overwrite)  # --overwrite sets aside the stages built on SFT too
    run_rm(cfg, resume, overwrite=overwrite)
    summary = run_ppo(cfg, resume, overwrite=overwrite)
    rt = setup_runtime(cfg)
    if ran:
        summary = _update_summary(out, rt, seconds=time.time() - t0)
    if rt.is_main and cfg.run.plots:
        summary_plot(Path(cfg.run.out))
    if rt.is_main:
        print(json.dumps({k: summary.get(k) for k in ("task_score_sft", "task_score_ppo", "rm_accuracy",
                                                       "kl_final", "seconds")}, indent=2))
    return summary
