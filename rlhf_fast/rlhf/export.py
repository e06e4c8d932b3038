"""`rlhf-fast export RUN_DIR [--stage sft|rm|ppo] --out DIR`: a run's model as a Hugging Face folder.

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

# which model of a stage's checkpoint is exported
STAGE_MODEL = {"sft": "model", "rm": "model", "ppo": "policy"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def stage_weights(run_dir, stage: str) -> dict:
    """The one place export reads a run: {config (GPTConfig dict), head, weights} of `stage`'s model.

    Reads <run_dir>/<stage>/checkpoint.pt (runtime.load_checkpoint); a change of checkpoint format
    only needs this function to follow it.
    """
    if stage not in STAGE_MODEL:
        raise ValueError(f"--stage must be one of {tuple(STAGE_MODEL)}, got {stage!r}")
    path = Path(run_dir) / stage / "checkpoint.pt"
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist: has the {stage} stage of this run been trained?")
    from .runtime import load_checkpoint
    return load_checkpoint(path)[STAGE_MODEL[stage]]


def _run_tokenizer(run_dir) -> str | None:
    from .config import load_file
    for name in ("config.yaml", "config.json"):
        if (Path(run_dir) / name).is_file():
            return (load_file(Path(run_dir) / name).get("run") or {}).get("tokenizer")
    return None


def export_run(run_dir, out, stage: str = "ppo") -> Path:
    """Write `stage`'s model of the run in `run_dir` as an HF folder `out` (tokenizer files copied when
    the run used an hf: tokenizer). Returns `out`."""
    from ..model import GPT, GPTConfig
    state = stage_weights(run_dir, stage)
    model = GPT(GPTConfig(**state["config"]), head=state["head"])
    model.load_state_dict(state["weights"])
    extra = {}
    spec = _run_tokenizer(run_dir)
    out = Path(out)
    if spec and spec.startswith("hf:"):
        from .tokenizer import get_tokenizer
        tok = get_tokenizer(spec)
        extra = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
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
    parser.add_argument("--stage", default="ppo", choices=tuple(STAGE_MODEL), help="which stage's model (default ppo)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write the HF model into")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out, args.stage)
    except ValueError as exc:
        print(f"rlhf-fast export: error: {exc}", file=sys.stderr)
        return 2
    print(f"rlhf-fast export: wrote {out}")
    return 0
