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
