"""`rlhf-fast` (also `python -m rlhf_fast`): the SFT, reward-model, PPO, RL and demo stages from the shell.

    rlhf-fast demo --out runs/demo                      # built-in task: SFT -> RM -> PPO
    rlhf-fast sft --out runs/x --sft.data=my_sft.jsonl  # one stage, own data
    rlhf-fast ppo --config ppo.yaml --ppo.kl_coef=0.02  # YAML/JSON file, then overrides
    rlhf-fast ppo --resume runs/x                       # continue a killed run from its last checkpoint
    rlhf-fast ppo --out runs/x --overwrite              # train the stage again (later stages removed)
    rlhf-fast sample runs/x --prompt "sort:3915="       # what the trained policy answers
    rlhf-fast demo --algo grpo --out runs/g             # built-in task: SFT -> GRPO on verifiable answers
    rlhf-fast rl --rl.algo=rloo --rl.reward_fn=my:fn    # critic-free RL (--rl.algo=ppo: the ppo stage)
    rlhf-fast export runs/x --out hf/x                  # the PPO policy as a Hugging Face folder
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
    "sft": ("supervised fine-tuning on prompt -> response demonstrations",
            ("run", "model", "task", "sft", "lora", "train")),
    "rm": ("reward model on preference pairs (Bradley-Terry loss)", ("run", "model", "task", "rm", "lora", "train")),
    "ppo": ("PPO against the reward model with a KL penalty to the SFT policy",
            ("run", "model", "task", "ppo", "lora", "train")),
    "demo": ("the whole pipeline on the built-in sorting task",
             ("run", "model", "task", "sft", "rm", "ppo", "rl", "lora", "train")),
    "rl": ("RL by --rl.algo: ppo (the ppo stage), or critic-free grpo, dr_grpo, rloo, reinforce_pp",
           ("run", "model", "task", "ppo", "rl", "lora", "train")),
}


def _type_name(typ) -> str:
    if typing.get_origin(typ) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(typ))) + "}"
    return typ.__name__.upper()


def build_parser() -> argparse.ArgumentParser:
    from .rlhf.config import SECTIONS, field_help
    parser = argparse.ArgumentParser(prog="rlhf-fast", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="{sft,rm,ppo,demo,rl,sample,export}")
    for stage, (what, sections) in STAGES.items():
        p = sub.add_parser(stage, help=what, description=what, allow_abbrev=False)
        p.add_argument("--config", metavar="FILE", help="YAML or JSON config file, nested by section")
        p.add_argument("--out", metavar="DIR", help="run directory (same as --run.out)")
        p.add_argument("--resume", metavar="DIR",
                       help="continue the run in DIR from its last checkpoints, with its saved config")
        p.add_argument("--overwrite", action="store_true",
                       help="train the stage again in a run that has it, removing its results and the later "
                            "stages' (without it, such a run is refused)")
        if stage == "demo":
            p.add_argument("--algo", dest="rl.algo", default=argparse.SUPPRESS,
                           choices=["ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp"],
                           help="ppo: SFT -> reward model -> PPO (default); otherwise SFT -> this critic-free "
                                "algorithm on the task's verifiable answers (same as --rl.algo)")
        for section in (*sections, "data"):  # every stage reads data files
            cls = SECTIONS[section]
            group = p.add_argument_group(f"{section} options")
            docs = field_help(cls)
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                group.add_argument(f"--{section}.{f.name}", dest=f"{section}.{f.name}", default=argparse.SUPPRESS,
                                   metavar=_type_name(hints[f.name]),
                                   help=f"{docs.get(f.name, '')} (default: {f.default!r})")
    p = sub.add_parser("sample", help="print what a run's trained policy answers to a prompt",
                       description="print what a run's trained policy answers to a prompt", allow_abbrev=False)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for several)")
    p.add_argument("--stage", choices=("ppo", "rl", "sft"), default="ppo",
                   help="policy after PPO, after the critic-free rl stage, or after SFT")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="default: the run's ppo.max_new_tokens (rl.max_new_tokens for --stage rl)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    sub.add_parser("export", add_help=False, help="a run's model as a Hugging Face folder (rlhf-fast export -h)")
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
    if args.resume:  # the stage's own record of what it trained, else the run's last one
        candidates = [Path(args.resume) / d / name for d in (args.stage, ".")
                      for name in ("config.yaml", "config.json")]
        saved = next((p for p in candidates if p.is_file()), None)
        if saved is None:
            raise ValueError(f"--resume: {str(candidates[2])!r} does not exist (not a run directory?)")
        base = load_file(saved)
        overrides["run.out"] = args.resume
    if args.out:
        if args.resume and Path(args.out) != Path(args.resume):
            raise ValueError("--out and --resume name different directories; --resume DIR continues DIR")
        overrides["run.out"] = args.out
    cfg = build_config(args.config, overrides, base=base)
    return args.stage, cfg, bool(args.resume), args.overwrite


def _sample(argv: list[str]) -> int:
    from .rlhf.answer import answer
    args = build_parser().parse_args(argv)
    for prompt in args.prompt:
        print(answer(args.run_dir, prompt, args.stage, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                     device=args.device))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sample"]:
        try:
            return _sample(argv)
        except (ValueError, OSError) as exc:
            print(f"rlhf-fast sample: error: {exc}", file=sys.stderr)
            return 1
    if argv[:1] == ["export"]:
        from .rlhf.export import main as export_main
        return export_main(argv[1:])
    try:
        stage, cfg, resume, overwrite = parse(argv)
    except ValueError as exc:
        print(f"rlhf-fast: error: {exc}", file=sys.stderr)
        return 2
    from .rlhf import pipeline
    from .rlhf.runtime import NonFiniteError
    from .rlhf import rl_pipeline
    runner = {"sft": pipeline.run_sft, "rm": pipeline.run_rm, "ppo": pipeline.run_ppo, "demo": pipeline.run_demo,
              "rl": rl_pipeline.run_rl}
    try:
        runner[stage](cfg, resume=resume, overwrite=overwrite)
    except (NonFiniteError, ValueError) as exc:
        print(f"rlhf-fast {stage}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a read-only or full disk under --out
        where = f": {exc.filename}" if exc.filename else ""
        print(f"rlhf-fast {stage}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nrlhf-fast {stage}: interrupted; continue with: rlhf-fast {stage} --resume {cfg.run.out}",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
