"""Stopping a run after a given step, as a preemption there would, leaving the stage's last checkpoint behind.

`stop_after(step)` is an `on_step` callback for the stages (they call it after each step and its checkpoint).
As a script, `torchrun ... stop_after.py STEP <rlhf-fast arguments>` runs a stage as `rlhf-fast` does with
that callback on every rank: a stop rather than a kill keeps the test deterministic, and every rank leaves at
the same step, so none waits on a collective the others never join.
"""
import sys


class Stop(Exception):
    pass


def stop_after(step: int):
    def on_step(done: int) -> None:
        if done == step:
            raise Stop
    return on_step


def main(step: int, argv: list[str]) -> None:
    import torch.distributed as dist

    from rlhf_fast.cli import parse
    from rlhf_fast.rlhf import pipeline

    stage, cfg, resume, overwrite = parse(argv)
    try:
        getattr(pipeline, f"run_{stage}")(cfg, resume=resume, on_step=stop_after(step), overwrite=overwrite)
    except Stop:
        dist.destroy_process_group()
        return
    sys.exit(f"{stage} ended before step {step}")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
