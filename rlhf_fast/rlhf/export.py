"""`rlhf-fast export RUN_DIR [--stage sft|rm|ppo|rl] --out DIR [--merge]`: a run's model as a Hugging Face folder.

The policy (sft, ppo) is written as *ForCausalLM, the reward model (rm) as *ForSequenceClassification,
in the family its weights came from (or the one its switches match). When the run used an `hf:`
tokenizer, its files are copied alongside and its bos/eos/pad ids go into config.json, so
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` work.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def export_run(run_dir, out, stage: str = "ppo", merge: bool = False) -> Path:
    """Write the model `stage` trained in the run at `run_dir` as an HF folder `out` (tokenizer files copied
    when the run used an hf: tokenizer). Returns `out`. ValueError (one line) for a run without the stage,
    an unfinished stage, or a model no HF family can hold.

    A LoRA model is written as PEFT adapters (adapter_config.json + adapter_model.safetensors) in `out`
    with its base model (the weights the adapters were trained on) as an HF folder in `out`/base, which
    the adapter config names; merge=True writes the merged full weights in `out` instead."""
    import torch

    from .run_dir import check_tokenizer, trained_model
    from .runtime import load_model
    cfg, state = trained_model(run_dir, stage)  # reads <stage>/checkpoint.safetensors (or an older .pt)
    model = load_model(state, torch.device("cpu"), merge=merge)
    extra = {}
    spec = cfg.run.tokenizer
    out = Path(out)
    if spec.startswith("hf:"):
        tok = check_tokenizer(spec)
        eos = tok.eos_id if len(tok.stop_ids) == 1 else list(tok.stop_ids)  # a chat template's end of turn too
        extra = {"bos_token_id": tok.bos_id, "eos_token_id": eos, "pad_token_id": tok.pad_id}
    if getattr(model, "lora_config", None) is not None:
        from ..model import GPT, save_adapters
        base = GPT(model.config, head=model.head)  # the base weights only: plain Linears, no adapters
        base.load_state_dict({n: t for n, t in model.state_dict().items() if ".lora_" not in n})
        base.save_pretrained(out / "base", extra_config=extra)
        save_adapters(model, out, base_model_name_or_path=str((out / "base").resolve()))
    else:
        model.save_pretrained(out, extra_config=extra)
    if extra:
        source = Path(spec[3:])
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, out / name)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-fast export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (--run.out of the training run)")
    parser.add_argument("--stage", default="ppo", choices=("sft", "rm", "ppo", "rl"),
                        help="which stage's model (default ppo; rl: the critic-free stage's policy)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write the HF model into")
    parser.add_argument("--merge", action="store_true",
                        help="a LoRA run: write the merged full weights (default: PEFT adapters + DIR/base)")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out, args.stage, merge=args.merge)
    except ValueError as exc:
        print(f"rlhf-fast export: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a read-only --out
        where = f": {exc.filename}" if exc.filename else ""
        print(f"rlhf-fast export: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    print(f"rlhf-fast export: wrote {out}")
    return 0
