"""`rlhf-fast` (also `python -m rlhf_fast`): the SFT, reward-model, PPO and demo stages from the shell.

    rlhf-fast demo --out runs/demo                      # built-in task: SFT -> RM -> PPO
    rlhf-fast sft --out runs/x --sft.data=my_sft.jsonl  # one stage, own data
    rlhf-fast ppo --config ppo.yaml --ppo.kl_coef=0.02  # YAML/JSON file, then overrides
    rlhf-fast ppo --resume runs/x                       # continue a killed run from its last checkpoint
    torchrun --nproc_per_node=2 -m rlhf_fast ppo ...    # DDP (FSDP2 with --run.distributed=fsdp)

Every field of the config is an option `--<section>.<field>=<value>`; `rlhf-fast <stage> --help` lists
them with their meaning and default.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

STAGES = {
    "sft": ("supervised fine-tuning on prompt -> response demonstrations", ("run", "model", "task", "sft")),
    "rm": ("reward model on preference pairs (Bradley-Terry loss)", ("run", "model", "task", "rm")),
    "ppo": ("PPO against the reward model with a KL penalty to the SFT policy", ("run", "model", "task", "ppo")),
    "demo": ("the whole pipeline on the built-in sorting task", ("run", "model", "task", "sft", "rm", "ppo")),
}


def _type_name(typ) -> str:
    if typing.get_origin(typ) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(typ))) + "}"
    return typ.__name__.upper()


def build_parser() -> argparse.ArgumentParser:
    from .rlhf.config import SECTIONS, field_help
    parser = argparse.ArgumentParser(prog="rlhf-fast", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="{sft,rm,ppo,demo,export}")
    sub.add_parser("export", add_help=False, help="a run's model as a Hugging Face folder (rlhf-fast export -h)")
    for stage, (what, sections) in STAGES.items():
        p = sub.add_parser(stage, help=what, description=what, allow_abbrev=False)
        p.add_argument("--config", metavar="FILE", help="YAML or JSON config file, nested by section")
        p.add_argument("--out", metavar="DIR", help="run directory (same as --run.out)")
        p.add_argument("--resume", metavar="DIR",
                       help="continue the run in DIR from its last checkpoints, with its saved config")
        for section in sections:
            cls = SECTIONS[section]
            group = p.add_argument_group(f"{section} options")
            docs = field_help(cls)
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                group.add_argument(f"--{section}.{f.name}", dest=f"{section}.{f.name}", default=argparse.SUPPRESS,
                                   metavar=_type_name(hints[f.name]),
                                   help=f"{docs.get(f.name, '')} (default: {f.default!r})")
    return parser


def parse(argv: list[str] | None = None):
    """argv -> (stage, Config, resume). Raises ValueError for unknown or invalid config fields."""
    from .rlhf.config import build_config, load_file
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    for item in extra:  # --section.field=value the parser did not know: let the config name the field
        if not item.startswith("--"):
            raise ValueError(f"unexpected argument {item!r}; options look like --<section>.<field>=<value>")
        key, _, value = item[2:].partition("=")
        overrides[key] = value
    base = None
    if args.resume:
        candidates = [Path(args.resume) / name for name in ("config.yaml", "config.json")]
        saved = next((p for p in candidates if p.is_file()), None)
        if saved is None:
            raise ValueError(f"--resume: {str(candidates[0])!r} does not exist (not a run directory?)")
        base = load_file(saved)
        overrides["run.out"] = args.resume
    if args.out:
        if args.resume and Path(args.out) != Path(args.resume):
            raise ValueError("--out and --resume name different directories; --resume DIR continues DIR")
        overrides["run.out"] = args.out
    cfg = build_config(args.config, overrides, base=base)
    return args.stage, cfg, bool(args.resume)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        from .rlhf.export import main as export_main
        return export_main(argv[1:])
    try:
        stage, cfg, resume = parse(argv)
    except ValueError as exc:
        print(f"rlhf-fast: error: {exc}", file=sys.stderr)
        return 2
    from .rlhf import pipeline
    from .rlhf.runtime import NonFiniteError
    runner = {"sft": pipeline.run_sft, "rm": pipeline.run_rm, "ppo": pipeline.run_ppo, "demo": pipeline.run_demo}
    try:
        runner[stage](cfg, resume=resume)
    except (NonFiniteError, ValueError) as exc:
        print(f"rlhf-fast {stage}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
