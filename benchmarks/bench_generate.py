"""generate() tokens/s against transformers' `generate` on the same random GPT-2 weights.

    python -m benchmarks.bench_generate --suite cpu   # small GPT-2 on CPU (reference ops), ratio vs HF
    python -m benchmarks.bench_generate --suite gpu   # 125M GPT-2, B=64, 1024 prompt + 256 new, bf16
    add --quick (or RLHF_FAST_BENCH_QUICK=1) for one timed run of the greedy modes only

Both sides decode the same prompts for exactly max_new_tokens (no EOS), greedy and top-k sampled;
HF uses its default dynamic KV cache with SDPA attention. tokens/s counts new tokens only:
B * max_new_tokens / wall time of the whole call (prefill included). Each call is timed end to end
(a generate call is seconds long, so triton.testing.do_bench's many-repetition loop does not fit):
one warm-up, then the best of `--reps` synchronized runs, ours and HF interleaved. The greedy rows also report how many
tokens agree with HF's greedy output (bf16 on GPU may flip near-ties; fp32 on CPU should agree).
The GPU suite also reports peak memory and the decode phase's achieved HBM bandwidth
(weights + live KV cache read once per step), as gpt-fast does.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.common import machine, markdown_table, write_results

SUITES = {
    # name: (GPT2Config kwargs, batch, prompt length, new tokens, dtype, device)
    "cpu": (dict(n_layer=4, n_head=4, n_embd=256, n_positions=256, vocab_size=50257), 8, 32, 32,
            torch.float32, "cpu"),
    "gpu": (dict(n_layer=12, n_head=12, n_embd=768, n_positions=2048, vocab_size=50257), 64, 1024, 256,
            torch.bfloat16, "cuda"),
}
# name: (generate() options, matching transformers generate() options); the CUDA-graph row reuses
# the greedy HF timing
MODES = {
    "greedy": (dict(temperature=0.0), dict(do_sample=False)),
    "greedy, cuda_graph": (dict(temperature=0.0, cuda_graph=True), dict(do_sample=False)),
    "top_k=50": (dict(temperature=1.0, top_k=50), dict(do_sample=True, temperature=1.0, top_k=50, top_p=1.0)),
    "top_k=50, cuda_graph": (dict(temperature=1.0, top_k=50, cuda_graph=True),
                             dict(do_sample=True, temperature=1.0, top_k=50, top_p=1.0)),
}
QUICK_MODES = ("greedy", "greedy, cuda_graph")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fns: dict, device: str, reps: int) -> dict:
    """{name: (best seconds, last output)} for each zero-argument fn, runs interleaved so that a
    shared machine's load drifts over all of them alike; one untimed warm-up call each first."""
    for fn in fns.values():
        fn()  # warm-up: allocator, extension / Triton compilation, CUDA-graph capture
    best = {name: (float("inf"), None) for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            best[name] = (min(best[name][0], time.perf_counter() - t0), out)
    return best


def run_suite(name: str, reps: int, quick: bool) -> list[dict]:
    import transformers

    from rlhf_fast.model import GPT, generate

    hf_kwargs, B, P, N, dtype, device = SUITES[name]
    if device == "cuda" and not torch.cuda.is_available():
        print(f"suite {name!r} skipped: no CUDA device")
        return []
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(**hf_kwargs, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).to(device=device, dtype=dtype).eval()
    ours = GPT.from_hf_gpt2(hf).to(device=device, dtype=dtype).eval()
    prompts = torch.randint(1, hf_cfg.vocab_size, (B, P), device=device)
    mask = torch.ones_like(prompts)
    param_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    c = ours.config
    kv_bytes_per_token = 2 * c.n_layer * c.n_kv_head * c.head_size * torch.finfo(dtype).bits // 8

    rows, hf_times = [], {}
    for mode in QUICK_MODES if quick else MODES:
        sampling, hf_sampling = MODES[mode]
        if sampling.get("cuda_graph") and device != "cuda":
            continue

        def run_ours():
            return generate(ours, prompts, N, seed=0, **sampling)

        def run_hf():
            return hf.generate(prompts, attention_mask=mask, max_new_tokens=N, min_new_tokens=N,
                               pad_token_id=0, **hf_sampling)

        fns = {"ours": run_ours}
        key = str(hf_sampling)
        if key not in hf_times:
            fns["hf"] = run_hf
        timed = _timed(fns, device, reps)
        hf_times.setdefault(key, timed.get("hf"))
        (t_ours, out), (t_hf, hf_out) = timed["ours"], hf_times[key]
        row = dict(suite=name, mode=mode, shape=f"B={B} P={P} new={N}", dtype=str(dtype).split(".")[-1],
                   ours_tok_s=B * N / t_ours, hf_tok_s=B * N / t_hf, ratio=t_hf / t_ours)
        if not hf_sampling["do_sample"]:
            row["agree_with_hf"] = (out.tokens == hf_out[:, P:]).float().mean().item()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            run_ours()
            peak = torch.cuda.max_memory_allocated() / 2**30  # during our call (HF weights stay resident too)
            t_prefill = _timed({"prefill": lambda: generate(ours, prompts, 1, seed=0, **sampling)}, device,
                               reps)["prefill"][0]
            t_decode = max(t_ours - t_prefill, 1e-9)
            bytes_read = (N - 1) * (param_bytes + B * (P + N / 2) * kv_bytes_per_token)
            row.update(peak_gib=peak, prefill_s=t_prefill, decode_gbps=bytes_read / t_decode / 1e9)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("RLHF_FAST_BENCH_QUICK") == "1",
                        help=f"one timed run, modes {QUICK_MODES} only (gpu_check.sh)")
    args = parser.parse_args(argv)
    reps = 1 if args.quick else args.reps
    rows = []
    for name in SUITES if args.suite == "all" else [args.suite]:
        rows += run_suite(name, reps, args.quick)
    print(machine())
    print(markdown_table(rows))
    if rows:
        print("results:", write_results("generate", rows))


if __name__ == "__main__":
    main()
