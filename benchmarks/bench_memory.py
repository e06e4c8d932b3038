"""Peak memory and step time of one PPO step and one GRPO step, full fine-tuning vs LoRA vs LoRA with
gradient checkpointing and accumulation, against the memory plan's estimate (rlhf/memory_plan.py).

    python -m benchmarks.bench_memory            # 125M-class GPT-2 and Llama-shaped configs (CPU: minutes)
    python -m benchmarks.bench_memory --quick    # tiny configs, a smoke test (seconds)
    python -m benchmarks.bench_memory --fits     # the README's what-fits table, computed by the plan

A step is what the stages run per iteration: generate and score a rollout (collect_rollout /
collect_group_rollout), then one epoch of updates (ppo_update: policy and value; policy_update: GRPO),
on random weights and random prompts. Each case runs in its own process, so that its peak is its own:
"measured" is the peak resident set (VmHWM) of that process during its steps minus its resident set
before the models were built (the interpreter, torch and its thread pools); on CUDA it is
max_memory_allocated. "estimate" is memory_plan.stage_plan's total for the same config (weights,
gradients, AdamW state, the largest model's activations and the generation KV cache); "error" is
estimate / measured - 1 (goal: within 25%). The time is that of the measured step, which also allocates
the AdamW state (as a stage's first iteration does).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

CONFIGS = {  # 125M-class: GPT-2 small, and a Llama-shaped model of the same width
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=128),
    "llama-134m": dict(n_layer=12, n_head=12, n_kv_head=4, n_embd=768, n_inner=2048, vocab_size=32000,
                       block_size=128, norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False,
                       tie_word_embeddings=False),
}
QUICK = {
    "gpt2-tiny": dict(n_layer=2, n_head=4, n_embd=128, vocab_size=2048, block_size=64),
    "llama-tiny": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=128, n_inner=256, vocab_size=2048, block_size=64,
                       norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, tie_word_embeddings=False),
}
VARIANTS = {  # train / lora overrides of each variant
    "full": {},
    "lora": {"lora.r": 16},
    "lora+ckpt+accum4": {"lora.r": 16, "train.grad_checkpointing": "true", "train.grad_accum": 4},
}
ROWS, PROMPT, NEW = 8, 16, 16  # rollout rows (PPO: prompts; GRPO: 2 prompts x 4 samples), prompt and response


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1])


class _Tok:
    """What the rollout code needs of a tokenizer, for random ids: pad, BOS, stop id, decode."""
    pad_id, bos_id, stop_ids = 0, 1, (2,)

    def decode(self, ids) -> str:
        return ""


def _cfg(model: dict, algo: str, variant: str, device: str):
    from rlhf_fast.rlhf.config import build_config
    overrides = {f"model.{k}": v for k, v in model.items() if k != "vocab_size"}
    overrides.update({"run.device": device, "run.progress": "false", "run.threads": 1, "ppo.max_new_tokens": NEW,
                      "ppo.rollout_batch_size": ROWS, "ppo.gen_batch_size": ROWS, "ppo.minibatch_size": ROWS,
                      "ppo.ppo_epochs": 1, "rl.algo": algo if algo != "ppo" else "grpo", "rl.max_new_tokens": NEW,
                      "rl.group_size": 4, "rl.rollout_batch_size": ROWS // 4, "rl.gen_batch_size": ROWS // 4,
                      "rl.minibatch_size": ROWS, "rl.kl_coef": 0.04, **VARIANTS[variant]})
    return build_config(None, overrides)


def _setup(cfg, model: dict, algo: str, device: str):
    """The stage's models for `cfg` on random weights, and step(i): one iteration (rollout + update)."""
    from rlhf_fast.rlhf import critic_free_trainer as cf
    from rlhf_fast.rlhf.lora_stage import apply_run_lora, reference_policy, value_on_reward_backbone
    from rlhf_fast.rlhf.memory_switches import frozen, trained
    from rlhf_fast.rlhf.ppo import advantages_and_returns, collect_rollout, ppo_update
    from rlhf_fast.rlhf.runtime import Runtime, build_model, make_optimizer

    rt, V = Runtime(device=torch.device(device)), model["vocab_size"]
    torch.manual_seed(0)
    policy = trained(cfg, apply_run_lora(cfg, build_model(cfg, V).to(device)))
    ref = frozen(cfg, reference_policy(cfg, policy, None, rt.device) if cfg.lora.r else build_model(cfg, V).to(device))
    reward = build_model(cfg, V, head="reward").to(device)
    models = {"policy": policy.eval(), "ref": ref, "reward": reward if algo == "ppo" and cfg.lora.r else frozen(cfg, reward)}
    if algo == "ppo" and cfg.lora.r:  # as the ppo stage: adapters and a value head on the reward's backbone
        value, models["reward"] = value_on_reward_backbone(cfg, reward)
        models["value"] = trained(cfg, value).eval()
    elif algo == "ppo":
        models["value"] = trained(cfg, build_model(cfg, V, head="value").to(device)).eval()
    if algo == "ppo":
        opts = {k: make_optimizer(models[k], 1e-5, 0.0) for k in ("policy", "value")}
    else:
        opt, preset = make_optimizer(policy, 1e-5, 0.0), cf.resolve(cfg.rl)
    n_prompts = ROWS if algo == "ppo" else ROWS // 4
    prompts = torch.randint(3, V, (n_prompts, PROMPT)).tolist()

    def step(i: int) -> None:
        if algo == "ppo":
            b = collect_rollout(models, prompts, PROMPT, _Tok(), cfg, rt, i)
            _, _, adv, ret = advantages_and_returns(b, cfg.ppo.kl_coef, cfg.ppo)
            ppo_update(models, opts, b, adv, ret, PROMPT, cfg, rt, i)
        else:
            b = cf.collect_group_rollout(models, prompts, [{"prompt": ""}] * n_prompts, PROMPT, _Tok(), cfg, rt, i)
            b.scores = torch.randn_like(b.scores)  # random weights: a reward that varies within groups
            _, adv = cf.advantages(b, cfg.rl, preset)
            cf.policy_update(models, opt, b, adv, PROMPT, cfg, rt, i, preset)
    return models, step


def run_case(name: str, model: dict, algo: str, variant: str, device: str) -> dict:
    """One case in this process: a warm-up step on a tiny model of the same shape (it pages in the code
    and the allocator pools the real step would otherwise count), then one measured step."""
    import gc

    from rlhf_fast.rlhf.memory_plan import GIB, stage_plan
    tiny = {**model, "n_layer": 1, "n_embd": 64, "n_head": 4, "vocab_size": 512,
            **({"n_inner": 128, "n_kv_head": 2} if "n_inner" in model else {})}
    _setup(_cfg(tiny, algo, variant, device), tiny, algo, device)[1](1)
    gc.collect()
    base = _rss_kib("VmRSS")
    if device == "cpu":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := the current resident set
    else:
        torch.cuda.reset_peak_memory_stats()
    cfg = _cfg(model, algo, variant, device)
    models, step = _setup(cfg, model, algo, device)
    t0 = time.perf_counter()
    step(1)
    seconds = time.perf_counter() - t0
    measured = (_rss_kib("VmHWM") - base) * 1024 if device == "cpu" else torch.cuda.max_memory_allocated()
    plan = stage_plan(cfg, "ppo" if algo == "ppo" else "rl", models["policy"].config.to_dict(),
                      models["policy"].config.to_dict(), device_type=device, seq_len=PROMPT + NEW)
    return {"config": name, "algo": algo, "variant": variant, "measured_gib": measured / GIB,
            "estimate_gib": plan.total_bytes / GIB, "error": plan.total_bytes / measured - 1,
            "step_s": seconds, "threads": torch.get_num_threads()}


FITS_MODELS = {  # the shapes of Qwen2.5-0.5B, Qwen2.5-1.5B, Llama-2-7B and Qwen2.5-7B (GPTConfig fields)
    "Qwen2.5-0.5B": dict(n_layer=24, n_head=14, n_kv_head=2, n_embd=896, n_inner=4864, vocab_size=151936),
    "Qwen2.5-1.5B": dict(n_layer=28, n_head=12, n_kv_head=2, n_embd=1536, n_inner=8960, vocab_size=151936),
    "Llama-2-7B": dict(n_layer=32, n_head=32, n_kv_head=32, n_embd=4096, n_inner=11008, vocab_size=32000,
                       tie_word_embeddings=False),
    "Qwen2.5-7B": dict(n_layer=28, n_head=28, n_kv_head=4, n_embd=3584, n_inner=18944, vocab_size=152064,
                       tie_word_embeddings=False),
}
GPUS_GB = (24, 80, 141)


def fits_table() -> str:
    """Markdown: the memory plan of PPO and GRPO for each of FITS_MODELS (policy = reward model shape), on
    one GPU, bf16 autocast, fused attention, 1024-token sequences (512 + 512), 8 sequences per micro-batch,
    32 generated together, frozen models in bf16, gradient checkpointing; full fine-tuning vs LoRA r=16.
    The model keeps fp32 master weights and AdamW state for what it trains."""
    from rlhf_fast.model import GPTConfig
    from rlhf_fast.rlhf.config import build_config
    from rlhf_fast.rlhf.memory_plan import GIB, stage_plan
    lines = ["| model | stage | fine-tuning | plan (GiB) | " + " | ".join(f"{g} GB" for g in GPUS_GB) + " |",
             "|---|---|---|---:|" + "---|" * len(GPUS_GB)]
    for name, shape in FITS_MODELS.items():
        model = GPTConfig(**{**shape, "block_size": 1024, "norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope",
                             "bias": False, "qkv_bias": name.startswith("Qwen")}).to_dict()
        for stage, algo in (("ppo", "ppo"), ("rl", "grpo")):
            for label, r in (("full", 0), ("LoRA r=16", 16)):
                cfg = build_config(None, {
                    "run.dtype": "bfloat16", "model.block_size": 1024, "lora.r": r, "train.frozen_dtype": "bfloat16",
                    "train.grad_checkpointing": "true", "ppo.minibatch_size": 64, "ppo.rollout_batch_size": 64,
                    "ppo.gen_batch_size": 32, "rl.algo": algo, "rl.group_size": 8, "rl.rollout_batch_size": 8,
                    "rl.gen_batch_size": 4, "rl.minibatch_size": 64, "train.grad_accum": 8})
                total = stage_plan(cfg, stage, model, model if stage == "ppo" else None, device_type="cuda").total_bytes
                cells = ["yes" if total <= g * 1e9 else "no" for g in GPUS_GB]
                lines.append(f"| {name} | {algo} | {label} | {total / GIB:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configs: a smoke test")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of each case")
    parser.add_argument("--fits", action="store_true", help="print the README's what-fits table (computed, no run)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # config:algo:variant, run by the parent process
    args = parser.parse_args(argv)
    if args.fits:
        print(fits_table())
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    configs = QUICK if args.quick or os.environ.get("RLHF_FAST_BENCH_QUICK") == "1" else CONFIGS
    if args.case:
        torch.set_num_threads(args.threads)
        name, algo, variant = args.case.split(":")
        print(json.dumps(run_case(name, configs[name], algo, variant, device)))
        return
    from benchmarks.common import machine, markdown_table, write_results
    rows = []
    for name in configs:
        for algo in ("ppo", "grpo"):
            for variant in VARIANTS:
                cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--case", f"{name}:{algo}:{variant}",
                       "--threads", str(args.threads)]
                if configs is QUICK:
                    cmd.append("--quick")
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(markdown_table(rows[-1:]), flush=True)
                path = write_results("memory" + ("-quick" if configs is QUICK else ""), rows,  # after each case
                                     {"threads": args.threads, "device": device})
    print(machine())
    print(markdown_table(rows, ["config", "algo", "variant", "measured_gib", "estimate_gib", "error", "step_s",
                                "threads"]))
    print(path)


if __name__ == "__main__":
    main()
