"""One PPO step split in its three phases, fused ops vs reference ops: tokens/s and peak memory.

    python -m benchmarks.bench_ppo_step --suite cpu   # small GPT on CPU
    python -m benchmarks.bench_ppo_step --suite gpu   # 125M GPT-2 shape, bf16 autocast (skipped without CUDA)
    python -m benchmarks.bench_ppo_step --suite trl   # whole update against trl 1.12's PPOTrainer (CPU, 1 thread)

Phases, on random weights and random prompts (no EOS, so every row runs max_new_tokens):
- generation: ``policy.generate`` (prefill + KV-cache decode + ``rlhf_fast.sample``); tokens/s counts
  the B * max_new_tokens sampled tokens;
- scoring: the reference policy's response logprobs (fused linear logprob), the value model and the
  reward model over the B * (P + T) rollout tokens;
- training: one policy and one value update (forward + backward + AdamW) over the rollout batch,
  through ``ppo_update`` (one epoch, one minibatch); tokens/s counts B * (P + T).
"fused" runs every model with backend="auto" (Triton / CUDA kernels on GPU; on CPU "auto" resolves to
the reference ops except where an op has a C++ kernel; the `backends` column says what "auto" chose);
"reference" forces the plain-PyTorch ops. Times are the best of `reps` synchronized runs after one warm-up (a phase
is tens of ms to seconds, too long for do_bench's repetition loop). Peak memory is CUDA-only.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import torch

from benchmarks.common import machine, markdown_table, stand_in_tokenizer, timed, write_results

SUITES = {
    # name: (model kwargs, batch, prompt length, new tokens, autocast dtype, device)
    "cpu": (dict(n_layer=2, n_head=4, n_embd=128, vocab_size=259), 32, 24, 16, None, "cpu"),
    "gpu": (dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257), 64, 512, 128, torch.bfloat16, "cuda"),
}


def _config(model_kwargs: dict, backend: str, P: int, T: int, B: int, device: str, epochs: int = 1):
    from rlhf_fast.rlhf.config import build_config
    overrides = {f"model.{k}": v for k, v in model_kwargs.items() if k != "vocab_size"}
    overrides.update({"model.block_size": P + T, "run.backend": backend, "run.device": device,
                      "run.progress": "false", "ppo.max_new_tokens": T, "ppo.rollout_batch_size": B,
                      "ppo.gen_batch_size": B, "ppo.minibatch_size": B, "ppo.ppo_epochs": epochs})
    return build_config(None, overrides)


def _chosen() -> str:
    """What backend="auto" resolved to for each op the phase called (extension_info()["chosen"])."""
    from rlhf_fast import extension_info
    return ", ".join(f"{op}={how}" for op, how in sorted(extension_info()["chosen"].items()))


def our_phases(model_kwargs: dict, B: int, P: int, T: int, dtype, device: str, backend: str, reps: int,
               epochs: int = 1, clock=time.perf_counter) -> dict:
    """{phase: (best seconds, peak GiB)} of one PPO update of rlhf_fast (generation, scoring, training)."""
    from rlhf_fast.rlhf.ppo import ppo_update
    from rlhf_fast.rlhf.rollout import Rollout, generate_chunk, response_logprobs, response_values
    from rlhf_fast.rlhf.runtime import Runtime, autocast, build_model, make_optimizer

    cfg = _config(model_kwargs, backend, P, T, B, device, epochs)
    if dtype is not None:
        cfg.run.dtype = "bfloat16"
    rt = Runtime(device=torch.device(device))
    torch.manual_seed(0)
    V = model_kwargs["vocab_size"]
    policy = build_model(cfg, V).to(device).eval()
    ref = copy.deepcopy(policy).requires_grad_(False)
    value = build_model(cfg, V, head="value").to(device).eval()
    reward = build_model(cfg, V, head="reward").to(device).eval().requires_grad_(False)
    models = {"policy": policy, "ref": ref, "value": value, "reward": reward}
    opts = {"policy": make_optimizer(policy, 1e-5, 0.0), "value": make_optimizer(value, 1e-5, 0.0)}
    tok = stand_in_tokenizer((V - 1,))  # one stop id in V: rows rarely stop before T tokens
    prompts = torch.randint(1, V, (B, P)).tolist()
    state = {}

    def generation():
        with autocast(cfg, rt.device):
            state["gen"] = generate_chunk(policy, prompts, P, tok, max_new_tokens=T, temperature=1.0, top_k=0,
                                          top_p=1.0, seed=0, device=rt.device)

    @torch.no_grad()
    def scoring():
        seqs, amask, mask, logprobs = state["gen"][:4]
        with autocast(cfg, rt.device):
            ref_lp, _ = response_logprobs(ref, seqs, amask, mask, P, 1.0)
            values = response_values(value, seqs, amask, P, T)
            scores = reward(seqs, attention_mask=amask)
        state["rollout"] = Rollout(seqs, amask, mask, logprobs.float(), ref_lp.float(), values.float(),
                                   scores.float(), torch.full_like(scores, float("nan")), torch.ones_like(scores))

    def training():
        b = state["rollout"]
        adv = torch.randn_like(b.values) * b.mask
        ppo_update(models, opts, b, adv, b.values + adv, P, cfg, rt, step=1)

    return {phase: timed(fn, device, reps, clock=clock) for phase, fn in
            (("generation", generation), ("scoring", scoring), ("training", training))}


def run_suite(name: str, reps: int) -> list[dict]:
    model_kwargs, B, P, T, dtype, device = SUITES[name]
    if device == "cuda" and not torch.cuda.is_available():
        print(f"suite {name!r} skipped: no CUDA device")
        return []
    rows = []
    for backend, label in (("auto", "fused"), ("reference", "reference")):
        phases = our_phases(model_kwargs, B, P, T, dtype, device, backend, reps)
        for phase, tokens in (("generation", B * T), ("scoring", B * (P + T)), ("training", B * (P + T))):
            seconds, peak = phases[phase]
            rows.append({"op": f"ppo_step/{phase}", "shape": f"B={B} P={P} T={T} {model_kwargs}",
                         "dtype": "bf16-autocast" if dtype else "fp32", "provider": label,
                         "ms": seconds * 1e3, "tokens_per_s": tokens / seconds, "peak_gib": peak,
                         "backends": _chosen() if backend == "auto" else "reference"})
    for r in rows:  # ratio of fused over reference throughput, per phase
        base = next(x for x in rows if x["op"] == r["op"] and x["provider"] == "reference")
        r["speedup_vs_reference"] = r["tokens_per_s"] / base["tokens_per_s"]
    return rows


# trl 1.12's PPOTrainer as the peer (issue 16): (model kwargs, prompts, prompt length, new tokens, PPO epochs)
TRL_CONFIGS = [
    (dict(n_layer=4, n_head=4, n_embd=256, vocab_size=8192), 16, 32, 32, 2),
    (dict(n_layer=4, n_head=4, n_embd=256, vocab_size=50257), 16, 32, 64, 2),
]


def run_trl_suite(reps: int, rounds: int = 3) -> list[dict]:
    """One PPO update, rlhf_fast against trl's PPOTrainer, phase by phase and in total, 1 CPU thread, fp32;
    best of `reps` updates (trl: after one warm-up update) in each of `rounds` processes per side, in
    process CPU time (with one thread it is the compute time, which the other tenants of a shared machine
    disturb far less than wall time; a whole process still ran 20% slow at times here).
    speedup = trl's seconds / ours. Each side runs in a fresh process (`trl_worker`), so that its peak
    memory is its own: the growth of the peak resident set over the process's after the imports (models,
    optimizer state, rollout and activations included)."""
    from benchmarks import _trl_peer
    why = _trl_peer.available()
    if why is not None:
        print(f"suite 'trl' skipped: {why}")
        return []
    rows = []
    for index, (model_kwargs, B, P, T, epochs) in enumerate(TRL_CONFIGS):
        runs = {"ours": [], "trl": []}
        for _ in range(rounds):  # sides interleaved, a fresh process each: a slow spell hits both
            for side in runs:
                runs[side].append(_spawn_trl_worker(side, index, reps))
        ours, peer = ({"phases": {k: min(r["phases"][k] for r in rs) for k in rs[0]["phases"]},
                       "peak_extra_mib": max(r["peak_extra_mib"] for r in rs)} for rs in runs.values())
        for r in (ours, peer):
            r["phases"]["total"] = sum(r["phases"].values())
        # each process's own total (its phases' best): how far apart runs of one code landed
        spread = {side: "-".join(f"{sum(r['phases'].values()) * 1e3:.0f}" for r in rs) for side, rs in runs.items()}
        for phase in ours["phases"]:
            a, b = ours["phases"][phase], peer["phases"][phase]
            total = phase == "total"
            rows.append({"op": f"ppo_update/{phase}", "shape": f"B={B} P={P} T={T} epochs={epochs} {model_kwargs}",
                         "dtype": "fp32", "ours_ms": a * 1e3, "trl_ms": b * 1e3, "speedup_vs_trl": b / a,
                         "threads": 1, "target": "total >= 1.5x" if total else "",
                         "met": b / a >= 1.5 if total else None,
                         "ours_process_totals_ms": spread["ours"] if total else "",
                         "trl_process_totals_ms": spread["trl"] if total else "",
                         "ours_peak_mib": ours["peak_extra_mib"], "trl_peak_mib": peer["peak_extra_mib"]})
    return rows


def trl_worker(side: str, index: int, reps: int) -> dict:
    """In a fresh process: one side's phases (best of reps, CPU seconds) and peak memory growth (MiB)."""
    from benchmarks import _trl_peer
    from benchmarks.bench_logprobs import _peak_rss_bytes, _reset_peak_rss, _rss_bytes
    torch.set_num_threads(1)
    import transformers  # noqa: F401  both sides import the same libraries before the baseline
    import trl  # noqa: F401
    model_kwargs, B, P, T, epochs = TRL_CONFIGS[index]
    base = _rss_bytes()
    _reset_peak_rss()
    if side == "ours":
        phases = {k: v[0] for k, v in our_phases(model_kwargs, B, P, T, None, "cpu", "auto", reps, epochs,
                                                 clock=time.process_time).items()}
    else:
        updates = _trl_peer.update_phases(model_kwargs, B, P, T, epochs, updates=reps + 1,
                                          clock=time.process_time)[1:]
        phases = {k: min(u[k] for u in updates) for k in updates[0]}
    return {"phases": phases, "peak_extra_mib": (_peak_rss_bytes() - base) / 2 ** 20}


def _spawn_trl_worker(side: str, index: int, reps: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_ppo_step", "--trl-worker", side, str(index), "--reps", str(reps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES) + ["trl"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--trl-worker", nargs=2, metavar=("SIDE", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_worker:
        print(json.dumps(trl_worker(args.trl_worker[0], int(args.trl_worker[1]), args.reps)))
        return
    quick = args.quick or os.environ.get("RLHF_FAST_BENCH_QUICK") == "1"
    if args.suite in ("cpu", "trl"):
        torch.set_num_threads(1)
    reps = 1 if quick else 5
    if args.suite == "trl":
        rows = run_trl_suite(reps if quick else 3, 1 if quick else 3)
        columns = ["op", "ours_ms", "trl_ms", "speedup_vs_trl", "target", "met", "ours_process_totals_ms",
                   "trl_process_totals_ms", "ours_peak_mib", "trl_peak_mib", "threads", "shape"]
    else:
        rows = run_suite(args.suite, reps)
        columns = ["op", "provider", "dtype", "ms", "tokens_per_s", "speedup_vs_reference", "peak_gib", "shape"]
    print(machine())
    print(markdown_table(rows, columns))
    if rows:
        print(write_results(f"ppo_step-{args.suite}", rows))


if __name__ == "__main__":
    main()
