"""Loading a Hugging Face folder: GPT.from_pretrained against transformers.AutoModelForCausalLM.

A random ~0.5B Llama-shaped model (Qwen2-0.5B's sizes: 24 layers, hidden 896, 14 query / 2 KV
heads, MLP 4864, vocab 151936, untied head) is written once as sharded bf16 safetensors. Each loader
then runs in its own subprocess, so peak RSS (VmHWM) is its own: we report load seconds, peak
RSS, and the growth of RSS during the load divided by the weights' bytes (1.0 = no copy beyond the
model itself). transformers 5 keeps bf16 weights as views of the memory-mapped files, so its RSS
stays low until the weights are first used; ours are read into the parameters, resident once loaded.

    python benchmarks/bench_load.py [--folder DIR] [--repeats 2]
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import markdown_table, write_results  # noqa: E402

SIZES = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, vocab_size=151936)

_CHILD = r"""
import json, sys, time
import torch
def status_mb(key):  # VmHWM, not ru_maxrss: a child inherits ru_maxrss from the parent that forked it
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024
which, folder = sys.argv[1], sys.argv[2]
if which == "ours":
    from rlhf_fast.model import GPT
    load = lambda: GPT.from_pretrained(folder)
else:
    import transformers
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
before = status_mb("VmRSS")
t = time.perf_counter()
model = load()
seconds = time.perf_counter() - t
peak = status_mb("VmHWM")
print(json.dumps({"seconds": seconds, "rss_before_mb": before, "peak_rss_mb": peak,
                  "dtype": str(next(model.parameters()).dtype)}))
"""


def write_folder(folder: Path, shard_bytes: int = 300 * 1024**2) -> int:
    """Random bf16 Llama weights under HF names, sharded; returns the weights' bytes."""
    from rlhf_fast.model.safetensors_io import write_folder as write_shards
    s = SIZES
    C, I, V, L = s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["num_hidden_layers"]
    D = C // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * D
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rand(V, C), "model.norm.weight": torch.ones(C, dtype=torch.bfloat16),
               "lm_head.weight": rand(V, C)}
    for i in range(L):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(C, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(C, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rand(C, C), p + "self_attn.k_proj.weight": rand(kv, C),
            p + "self_attn.v_proj.weight": rand(kv, C), p + "self_attn.o_proj.weight": rand(C, C),
            p + "mlp.gate_proj.weight": rand(I, C), p + "mlp.up_proj.weight": rand(I, C),
            p + "mlp.down_proj.weight": rand(C, I),
        })
    folder.mkdir(parents=True, exist_ok=True)
    write_shards(folder, tensors, shard_bytes)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SIZES, "hidden_act": "silu",
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure(which: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, which, str(folder)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, help="reuse or create the model folder here (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=2, help="loads per loader; the fastest is reported")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "llama-0.5b"
        weights = write_folder(folder)
        gc.collect()
        gb = weights / 1024**3
        rows = []
        for which, name in (("ours", "GPT.from_pretrained"), ("hf", "AutoModelForCausalLM.from_pretrained")):
            runs = [measure(which, folder) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["seconds"])
            growth = (best["peak_rss_mb"] - best["rss_before_mb"]) / (weights / 1024**2)
            rows.append({"loader": name, "weights_gb": round(gb, 3), "seconds": best["seconds"],
                         "peak_rss_mb": best["peak_rss_mb"], "rss_growth_over_weights": growth,
                         "dtype": best["dtype"]})
        rows[0]["speedup_vs_hf"] = rows[1]["seconds"] / rows[0]["seconds"]
    print(markdown_table(rows))
    print(write_results("load", rows, extra={"model": {"family": "llama", **SIZES, "dtype": "bfloat16",
                                                       "shards": "300 MiB"}}))


if __name__ == "__main__":
    main()
