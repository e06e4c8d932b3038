"""What every benchmark suite shares: the machine description, a markdown table, JSON results.

Each suite builds a list of row dicts with at least op, shape, dtype, ours, baseline, ratio (and,
where it applies, tflops / gbps against the ceiling measured in the same run), prints
`markdown_table(rows)` and calls `write_results(suite, rows)`, which writes
benchmarks/results/<suite>-<machine>.json with the machine, versions and date.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(os.environ.get("RLHF_FAST_RESULTS_DIR", Path(__file__).resolve().parent / "results"))


def machine() -> dict:
    info = {
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def machine_tag() -> str:
    m = machine()
    name = m.get("gpu") or f"cpu{m['cpu_count']}"
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(suite: str, rows: list[dict], extra: dict | None = None) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{suite}-{machine_tag()}.json"
    payload = {"suite": suite, "machine": machine(), "rows": rows, **(extra or {})}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
    return path


def timed(fn, device: str, reps: int, warm_up: bool = True, clock=time.perf_counter) -> tuple[float, float]:
    """(best seconds, peak memory GiB or nan) of fn over `reps` runs, after one warm-up run unless
    warm_up=False; on CUDA each run is synchronized and its peak allocation measured. clock: wall time by
    default; time.process_time (CPU time) for one-thread CPU runs on a shared machine."""
    if warm_up:
        fn()
    best, peak = float("inf"), float("nan")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = clock()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2 ** 30
        best = min(best, clock() - t0)
    return best, peak


def suite_main(name: str, doc: str, run_cpu, run_gpu, worker=None, worker_args: tuple = ()) -> None:
    """The command line of a benchmark with a CPU and a GPU suite: --suite cpu|gpu [--quick]; prints the
    table, writes benchmarks/results/<name>-<suite>-<machine>.json. worker(*args) runs one measurement
    in a fresh process (--worker ARGS, printed as JSON); worker_args names its arguments."""
    import argparse
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--suite", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer do_bench repetitions (gpu_check.sh)")
    if worker is not None:
        parser.add_argument("--worker", nargs=len(worker_args), metavar=worker_args, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if worker is not None and args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    if args.suite == "gpu":
        if not torch.cuda.is_available():
            print(f"{name} --suite gpu: no CUDA device here; GPU figures unmeasured")
            return
        rows = run_gpu(args.quick)
    else:
        rows = run_cpu()
    print(markdown_table([{k: v for k, v in r.items() if k != "runs"} for r in rows]))
    path = write_results(f"{name.removeprefix('bench_')}-{args.suite}", rows)
    print(f"machine: {machine()}")
    print(f"wrote {path}")


def stand_in_tokenizer(stop_ids: tuple[int, ...]):
    """What the rollout reads of a tokenizer (pad, BOS, stop ids: at least one) for benchmarks on random
    token ids."""
    return type("Tok", (), {"pad_id": 0, "bos_id": None, "stop_ids": tuple(stop_ids)})()
