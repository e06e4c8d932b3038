"""Filtered logprobs (cutoffs=, issue 13) against plain ones: what the kept-set test costs in both ops.

    python -m benchmarks.bench_filtered_logprobs --suite cpu     # reference backend, fp32
    python -m benchmarks.bench_filtered_logprobs --suite gpu [--quick]

Each op runs forward + backward of sum(g * logp) (token_logprobs: also the entropy, sum(g * logp + g2 * H)),
once with cutoffs=None ("plain", the baseline) and once with cutoffs ("filtered", ours). The cutoffs keep,
per row (KEPT_SETS):
  sampler  the sampler's own: rlhf_fast.sample(T=0.7, top_k=50, top_p=0.9, return_cutoffs=True), its drawn
           tokens as the targets (at most 50 kept per row: the use the op is for);
  wide     the tokens with x > x[target] - 1 (x = logit / T), targets uniform: about half the vocabulary
           kept, the worst case of the reference backend, which then masks the chunk densely.
The Triton kernels compare every logit once either way.

CPU suite (reference backend; shapes below): time = median of 5 runs per variant, the two variants
alternating in one process (so a change of machine load hits both), after one warm-up each; peak extra
memory = the process's peak resident set during one forward+backward (VmHWM reset just before) minus its
resident set once the inputs exist, each variant in a fresh process. The torch thread count is printed.

GPU suite (Triton, bf16): fused_linear_logprobs at N=8192, H=4096, V=128256 and token_logprobs on
materialized (8192, 128256) logits; times are triton.testing.do_bench medians, extra memory is
torch.cuda.max_memory_allocated over the allocation once the inputs exist. On a CPU-only machine the GPU
suite says so and exits 0.

Target (issue 13): filtered / plain time <= 1.1 and the same peak memory.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.bench_logprobs import _peak_rss_bytes, _reset_peak_rss, _rss_bytes
from benchmarks.common import suite_main

TEMPERATURE = 0.7
CPU_SHAPES = {"fused_linear_logprobs": (4096, 256, 32000), "token_logprobs": (1024, None, 32000)}  # N, H, V
GPU_SHAPES = {"fused_linear_logprobs": (8192, 4096, 128256), "token_logprobs": (8192, None, 128256)}
KEPT_SETS = ("sampler", "wide")
VARIANTS = ("plain", "filtered")


def make_inputs(op: str, n: int, h: int | None, vocab: int, dtype, device, kept: str = "sampler", seed=0) -> dict:
    """The op's inputs, targets, upstream gradients and cutoffs (KEPT_SETS[kept])."""
    import rlhf_fast
    gen = torch.Generator(device=device).manual_seed(seed)
    targets = torch.randint(0, vocab, (n,), generator=gen, device=device)
    g = torch.randn(2, n, generator=gen, device=device)
    if op == "token_logprobs":
        logits = torch.randn(n, vocab, generator=gen, device=device, dtype=dtype).mul_(3).requires_grad_()
        inputs = {"logits": logits}
        full = lambda rows: logits.detach()[rows]  # noqa: E731
    else:
        hidden = torch.randn(n, h, generator=gen, device=device, dtype=dtype).requires_grad_()
        weight = torch.randn(vocab, h, generator=gen, device=device, dtype=dtype).mul_(3 * h ** -0.5).requires_grad_()
        inputs = {"hidden": hidden, "weight": weight}
        full = lambda rows: hidden.detach()[rows] @ weight.detach().T  # noqa: E731
    if kept == "sampler":  # the drawn tokens and the sampler's cutoffs, 512 rows at a time
        parts = [rlhf_fast.sample(full(slice(s, s + 512)), temperature=TEMPERATURE, top_k=50, top_p=0.9,
                                  seed=seed + s, return_cutoffs=True) for s in range(0, n, 512)]
        targets = torch.cat([t for t, _ in parts])
        cutoffs = torch.cat([c for _, c in parts])
    else:
        x_target = torch.cat([full(slice(s, s + 512)).float().gather(-1, targets[s:s + 512, None]).squeeze(-1)
                              for s in range(0, n, 512)]) / TEMPERATURE
        cutoffs = torch.stack([(x_target - 1).double(), torch.zeros_like(x_target, dtype=torch.float64)], -1)
    return {**inputs, "targets": targets, "g": g, "cutoffs": cutoffs}


def step(op: str, variant: str, inp: dict, backend: str) -> None:
    """One forward + backward; gradients are cleared first so every step allocates them afresh."""
    import rlhf_fast
    cutoffs = inp["cutoffs"] if variant == "filtered" else None
    for name in ("logits", "hidden", "weight"):
        if name in inp:
            inp[name].grad = None
    if op == "token_logprobs":
        logp, ent = rlhf_fast.token_logprobs(inp["logits"], inp["targets"], temperature=TEMPERATURE,
                                             return_entropy=True, cutoffs=cutoffs, backend=backend)
        loss = (logp * inp["g"][0] + ent * inp["g"][1]).sum()
    else:
        logp = rlhf_fast.fused_linear_logprobs(inp["hidden"], inp["weight"], inp["targets"], temperature=TEMPERATURE,
                                               cutoffs=cutoffs, backend=backend)
        loss = (logp * inp["g"][0]).sum()
    loss.backward()


def cpu_worker(op: str, what: str, kept: str) -> dict:
    """In a fresh process: both variants' median times (alternating), or one variant's peak memory."""
    torch.manual_seed(0)
    n, h, vocab = CPU_SHAPES[op]
    warm = make_inputs(op, 16, 32 if h else None, 512, torch.float32, "cpu")
    for v in VARIANTS:
        step(op, v, warm, "reference")  # thread pools and allocator warm before any baseline
    del warm
    inp = make_inputs(op, n, h, vocab, torch.float32, "cpu", kept)
    if what in VARIANTS:
        base = _rss_bytes()
        _reset_peak_rss()
        step(op, what, inp, "reference")
        return {"extra_mb": (_peak_rss_bytes() - base) / 2**20}
    runs = {v: [] for v in VARIANTS}
    for v in VARIANTS:
        step(op, v, inp, "reference")
    for _ in range(5):
        for v in VARIANTS:
            t0 = time.perf_counter()
            step(op, v, inp, "reference")
            runs[v].append(time.perf_counter() - t0)
    return {"runs_s": runs, "threads": torch.get_num_threads()}


def _spawn(op: str, what: str, kept: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_filtered_logprobs", "--worker", op, what, kept],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(op, shape, dtype, times, mem, unit, mib, **extra) -> dict:
    """mib: one MiB in the memory unit (the slack for allocator/page noise, with 5%)."""
    ratio = times["filtered"] / times["plain"]
    same_mem = mem["filtered"] <= mem["plain"] * 1.05 + mib
    return {"op": f"{op} fwd+bwd", "shape": shape, "dtype": dtype, "ours": times["filtered"],
            "baseline": times["plain"], "unit": unit, "ratio": ratio, "extra_mem": mem["filtered"],
            "baseline_extra_mem": mem["plain"], **extra, "target": "ratio <= 1.1, same peak memory",
            "met": ratio <= 1.1 and same_mem}


def run_cpu() -> list[dict]:
    rows = []
    for op, (n, h, vocab) in CPU_SHAPES.items():
        for kept in KEPT_SETS:
            timing = _spawn(op, "time", kept)
            mem = {v: _spawn(op, v, kept)["extra_mb"] for v in VARIANTS}
            times = {v: statistics.median(timing["runs_s"][v]) for v in VARIANTS}
            shape = f"N={n},V={vocab}" if h is None else f"N={n},H={h},V={vocab}"
            rows.append(_row(op, shape, "float32", times, mem, "s (mem MiB)", 1.0, kept=kept, backend="reference",
                             threads=timing["threads"], runs=timing["runs_s"]))
    return rows


def run_gpu(quick: bool) -> list[dict]:
    rows = []
    for op in GPU_SHAPES:
        rows.append(_gpu_row(op, quick))
        torch.cuda.empty_cache()
    return rows


def _gpu_row(op: str, quick: bool) -> dict:
    import triton.testing
    n, h, vocab = GPU_SHAPES[op]
    inp = make_inputs(op, n, h, vocab, torch.bfloat16, "cuda", "sampler")
    times, mem = {}, {}
    for v in VARIANTS:
        step(op, v, inp, "triton")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(op, v, inp, "triton")
        torch.cuda.synchronize()
        mem[v] = (torch.cuda.max_memory_allocated() - base) / 1e9
        times[v] = triton.testing.do_bench(lambda: step(op, v, inp, "triton"), warmup=10 if quick else 25,
                                           rep=40 if quick else 100, return_mode="median")
    shape = f"N={n},V={vocab}" if h is None else f"N={n},H={h},V={vocab}"
    return _row(op, shape, "bfloat16", times, mem, "ms (mem GB)", 2**20 / 1e9, kept="sampler", backend="triton")


def main() -> None:
    suite_main("bench_filtered_logprobs", __doc__, run_cpu, run_gpu, cpu_worker, ("OP", "WHAT", "KEPT"))


if __name__ == "__main__":
    main()
