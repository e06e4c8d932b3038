"""CPU logprob/KL ops side by side with plain PyTorch and the cut-cross-entropy package, at a stated thread count.

    python -m benchmarks.bench_logprobs_cpu [--threads 1] [--quick]

Providers, forward + backward of sum(g * out) in fp32 (out = per-token logprob or KL):
  rlhf_fast  the op with backend="reference" (the CPU default).
  rlhf_fast_loss  rlhf_fast.fused_linear_token_loss with that same loss, sum(g * logp) or sum(g * kl)
             (given the reference head), as its loss_fn: what a trainer whose loss is known in the
             forward runs (gradient taken in the forward; rlhf_fast/fused_loss.py).
  naive      the unfused path the op replaces, e.g. for fused_linear_logprobs
             (hidden @ weight.T).log_softmax(-1).gather(-1, targets[:, None]).
  cce        cut-cross-entropy's torch.compile implementation (`pip install cut-cross-entropy`),
             -cross_entropy(linear) with reduction="none" = the logprob; only for fused_linear_logprobs
             (the package has no KL or materialized-logits op). Skipped, and said so, when not installed.

Each (op, shape, provider) runs in a fresh process: after a small warm-up shape (library init, and for
cce its compile with dynamic shapes), the first step at the benchmark shape gives the peak extra memory
(the process's peak resident set, VmHWM reset through /proc/self/clear_refs just before, minus the
resident set once the inputs exist; gradients included; `working_mib` leaves out the gradients of the
inputs, which every provider must return: token_logprobs' d(logits) is as large as the logits), then `--reps` more steps give the time (median
of process CPU time, which the other tenants of a shared machine disturb far less than wall time; the
wall times are kept in the JSON). The matmul FLOPs are stated so the times can be read against them:
the unfused, cce and rlhf_fast_loss paths run 3 (N, H, V) matmuls per step, rlhf_fast 4 (the backward
recomputes the logits instead of saving them; its custom op saves only per-row statistics), and for the
KL 4 (naive, rlhf_fast_loss) vs 6.

Results go to benchmarks/results/logprobs_cpu_t<threads>-<machine>.json and .md, with the CPU model
(lscpu) and the thread count.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.bench_logprobs import _peak_rss_bytes, _reset_peak_rss, _rss_bytes
from benchmarks.common import RESULTS_DIR, machine, machine_tag, markdown_table, write_results

SHAPES = {"fused_linear_logprobs": [(4096, 512, 32000), (8192, 768, 50257)],
          "fused_linear_kl_divergence": [(4096, 512, 32000)],
          "token_logprobs": [(4096, 0, 32000), (8192, 0, 50257)]}
PROVIDERS = {"fused_linear_logprobs": ("rlhf_fast", "rlhf_fast_loss", "naive", "cce"),
             "fused_linear_kl_divergence": ("rlhf_fast", "rlhf_fast_loss", "naive"),
             "token_logprobs": ("rlhf_fast", "naive")}
QUICK_SHAPES = {op: [(512, 64 if shapes[0][1] else 0, 4000)] for op, shapes in SHAPES.items()}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (lscpu failed)"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def make_inputs(op: str, n: int, h: int, vocab: int, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    g = torch.randn(n, generator=gen)
    if op == "token_logprobs":
        return torch.randn(n, vocab, generator=gen).mul_(2).requires_grad_(), targets, g
    hidden = torch.randn(n, h, generator=gen).requires_grad_()
    weight = torch.randn(vocab, h, generator=gen).mul_(h ** -0.5).requires_grad_()
    if op == "fused_linear_logprobs":
        return hidden, weight, targets, g
    ref_hidden = torch.randn(n, h, generator=gen)
    ref_weight = torch.randn(vocab, h, generator=gen).mul_(h ** -0.5)
    return hidden, weight, ref_hidden, ref_weight, g


def step_fn(op: str, provider: str):
    """A function(*inputs) running one forward + backward of sum(g * out)."""
    import rlhf_fast
    if op == "fused_linear_logprobs":
        if provider == "rlhf_fast":
            return lambda h, w, t, g: (rlhf_fast.fused_linear_logprobs(h, w, t, backend="reference") * g
                                       ).sum().backward()
        if provider == "rlhf_fast_loss":
            def token_loss(h, w, t, g):
                rlhf_fast.fused_linear_token_loss(h, w, t, lambda rows, stats: (stats.logp * g[rows]).sum(),
                                                  backend="reference")[0].backward()
            return token_loss
        if provider == "naive":
            return lambda h, w, t, g: ((h @ w.T).log_softmax(-1).gather(-1, t[:, None]).squeeze(-1) * g
                                       ).sum().backward()
        from cut_cross_entropy import linear_cross_entropy
        return lambda h, w, t, g: (-linear_cross_entropy(h, w, t, reduction="none", impl="torch_compile") * g
                                   ).sum().backward()
    if op == "fused_linear_kl_divergence":
        if provider == "rlhf_fast":
            return lambda h, w, rh, rw, g: (rlhf_fast.fused_linear_kl_divergence(h, w, rh, rw, backend="reference")
                                            * g).sum().backward()
        if provider == "rlhf_fast_loss":
            def kl_loss(h, w, rh, rw, g):
                t = torch.zeros(h.shape[0], dtype=torch.long)  # the composite reads a target per row (unused here)
                rlhf_fast.fused_linear_token_loss(h, w, t, lambda rows, stats: (stats.kl * g[rows]).sum(),
                                                  ref_hidden=rh, ref_weight=rw, backend="reference")[0].backward()
            return kl_loss

        def naive_kl(h, w, rh, rw, g):
            log_p, log_q = (h @ w.T).log_softmax(-1), (rh @ rw.T).log_softmax(-1)
            ((log_p.exp() * (log_p - log_q)).sum(-1) * g).sum().backward()
        return naive_kl
    if provider == "rlhf_fast":
        return lambda x, t, g: (rlhf_fast.token_logprobs(x, t, backend="reference") * g).sum().backward()
    return lambda x, t, g: (x.log_softmax(-1).gather(-1, t[:, None]).squeeze(-1) * g).sum().backward()


def matmul_flops(op: str, provider: str, n: int, h: int, vocab: int) -> int:
    per = 2 * n * h * vocab
    if op == "fused_linear_logprobs":
        return per * (4 if provider == "rlhf_fast" else 3)
    if op == "fused_linear_kl_divergence":
        return per * (6 if provider == "rlhf_fast" else 4)
    return 0


def worker(op: str, provider: str, shape: tuple, threads: int, reps: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    step = step_fn(op, provider)
    small = make_inputs(op, 64, 32 if shape[1] else 0, 512)
    step(*small)  # load kernels / thread pools / compile before the baseline
    del small
    inputs = make_inputs(op, *shape)
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    base = _rss_bytes()
    _reset_peak_rss()
    step(*inputs)
    extra_mb = (_peak_rss_bytes() - base) / 2**20
    grads_mb = sum(x.grad.numel() * x.grad.element_size() for x in leaves if x.grad is not None) / 2**20
    cpu_s, wall_s = [], []
    for _ in range(reps):
        for x in leaves:
            x.grad = None
        c0, w0 = time.process_time(), time.perf_counter()
        step(*inputs)
        cpu_s.append(time.process_time() - c0)
        wall_s.append(time.perf_counter() - w0)
    return {"extra_mib": extra_mb, "grads_mib": grads_mb, "cpu_s": statistics.median(cpu_s), "cpu_runs_s": cpu_s, "wall_runs_s": wall_s}


def available(provider: str) -> str | None:
    """None if the provider can run here, else why not."""
    if provider != "cce":
        return None
    try:
        import cut_cross_entropy  # noqa: F401
    except ImportError as exc:
        return f"cut-cross-entropy not installed ({exc})"
    return None


def _spawn(op, provider, shape, threads, reps) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_logprobs_cpu", "--worker", op, provider,
           ",".join(map(str, shape)), "--threads", str(threads), "--reps", str(reps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(threads: int, reps: int, quick: bool, ops: list[str]) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    for op, shapes in (QUICK_SHAPES if quick else SHAPES).items():
        if op not in ops:
            continue
        for shape in shapes:
            n, h, vocab = shape
            res = {}
            for provider in PROVIDERS[op]:
                why = available(provider)
                if why:
                    notes.append(f"{op} {provider}: skipped, {why}")
                    continue
                res[provider] = _spawn(op, provider, shape, threads, reps)
                print(f"{op} N={n} H={h} V={vocab} {provider}: {res[provider]['cpu_s']:.2f} s, "
                      f"{res[provider]['extra_mib']:.0f} MiB", flush=True)
            ours, naive = res["rlhf_fast"], res["naive"]
            for provider, r in res.items():
                flops = matmul_flops(op, provider, n, h, vocab)
                rows.append({
                    "op": op, "shape": f"N={n},H={h},V={vocab}" if h else f"N={n},V={vocab}", "provider": provider,
                    "threads": threads, "time_s": r["cpu_s"], "vs_naive_time": r["cpu_s"] / naive["cpu_s"],
                    "vs_ours_time": r["cpu_s"] / ours["cpu_s"], "extra_mib": r["extra_mib"],
                    "vs_naive_mem": r["extra_mib"] / naive["extra_mib"],
                    "working_mib": r["extra_mib"] - r["grads_mib"],
                    "vs_naive_working": (r["extra_mib"] - r["grads_mib"]) / (naive["extra_mib"] - naive["grads_mib"]),
                    "matmul_gflop": flops / 1e9 if flops else None,
                    "gflops": flops / r["cpu_s"] / 1e9 if flops else None,
                    "cpu_runs_s": r["cpu_runs_s"], "wall_runs_s": r["wall_runs_s"]})
    return rows, notes


COLUMNS = ["op", "shape", "provider", "threads", "time_s", "vs_naive_time", "vs_ours_time", "extra_mib",
           "vs_naive_mem", "working_mib", "vs_naive_working", "matmul_gflop", "gflops"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch/MKL/OpenMP threads (default 1)")
    parser.add_argument("--reps", type=int, default=2, help="timed steps per provider after the memory step")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: check that every provider runs")
    parser.add_argument("--ops", nargs="+", choices=list(SHAPES), default=list(SHAPES),
                        help="ops to run (default all); a subset writes its own results file")
    parser.add_argument("--worker", nargs=3, metavar=("OP", "PROVIDER", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        op, provider, shape = args.worker
        print(json.dumps(worker(op, provider, tuple(int(x) for x in shape.split(",")), args.threads, args.reps)))
        return
    rows, notes = run(args.threads, args.reps, args.quick, args.ops)
    model = cpu_model()
    table = markdown_table(rows, COLUMNS)
    header = (f"CPU: {model} ({os.cpu_count()} logical CPUs), {args.threads} thread(s), fp32, forward + backward, "
              f"time = median process CPU time of {args.reps} steps, each provider in a fresh process")
    print(header)
    print(table)
    for note in notes:
        print(note)
    suite = (f"logprobs_cpu_t{args.threads}" + ("_quick" if args.quick else "")
             + ("" if args.ops == list(SHAPES) else "_" + "_".join(args.ops)))
    path = write_results(suite, rows, extra={"cpu_model": model, "threads": args.threads, "notes": notes})
    md = RESULTS_DIR / f"{suite}-{machine_tag()}.md"
    md.write_text(f"# {suite}\n\n{header}; {machine()['date']}, torch {torch.__version__}\n\n{table}\n\n"
                  + "".join(f"- {n}\n" for n in notes))
    print(f"wrote {path} and {md}")


if __name__ == "__main__":
    main()
