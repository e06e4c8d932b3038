"""`ppo` killed (SIGKILL, no cleanup) at 13 points in turn, each launch a `--resume` of the one before: during
evaluation, a rollout, an update, mid metrics line, mid checkpoint write, between a checkpoint's write and
its rename, just after the rename, and while rewriting metrics, config, summary and result. The run then
ends with the metrics.jsonl of an uninterrupted run, byte for byte, and exactly its files: no temp files.

Each launch is a process forked from a fresh forkserver (a fork of the pytest process could hang in an
OpenMP runtime it had used), so it starts in a fraction of a second; a launch that was meant to be killed
and was not fails the test, so every kill point is known to have been hit.
"""
import multiprocessing
import os
import shutil
import signal

import pytest

from rlhf_fast.rlhf import checkpoint, pipeline, run_dir, run_io

from .test_pipeline import tiny

EXTRA = {"ppo.steps": 6, "ppo.ckpt_every": 2, "ppo.eval_every": 2}


def _die(*_):
    os.kill(os.getpid(), signal.SIGKILL)


def _half_write(data, path, *_, **__):
    """The real atomic writer, killed after half the bytes reached its temp file."""
    data = data.encode() if isinstance(data, str) else data
    run_io._atomic_write(path, lambda f: (f.write(data[:len(data) // 2]), f.flush(), _die()))


def _half_json(obj, path, *_, **__):
    import json
    _half_write(json.dumps(obj), path)


def _torn_line(original, self, step, **metrics):
    self._file.write('{"step": %d, "sco' % step)
    self._file.flush()
    _die()


def _kill_at(owner, name: str, n: int, match=None, during=None) -> None:
    """Kill this process at the n-th call of owner.name whose arguments satisfy `match`: before the call, or
    inside it through `during(original, *args)`."""
    original = getattr(owner, name)
    seen = [0]

    def wrapper(*args, **kwargs):
        if match is None or match(*args):
            seen[0] += 1
            if seen[0] == n:
                (during or (lambda *a, **k: _die()))(original, *args, **kwargs)
        return original(*args, **kwargs)
    setattr(owner, name, wrapper)


def _path_is(name: str):  # atomic_write_*(data, path): the path is the second argument
    return lambda data, path, *rest: str(path).endswith(name)


def _after(original, *args, **kwargs):
    original(*args, **kwargs)
    _die()


# (what the kill interrupts, how): the run resumes from its last checkpoint (every 2 steps of 6) each time
KILLS = [
    ("evaluation at step 0", lambda: _kill_at(pipeline_evaluate(), "generate_chunk", 1)),
    ("mid metrics line (step 1)", lambda: _kill_at(run_io.MetricsLogger, "log", 2,
                                                   during=lambda o, self, step, **m: _torn_line(o, self, step, **m))),
    ("rollout of step 2", lambda: _kill_at(ppo_module(), "make_rollout", 3)),
    ("mid checkpoint write (step 2)", lambda: _kill_at(checkpoint, "atomic_write_bytes", 1,
                                                       during=lambda o, d, p: _half_write(d, p))),
    ("checkpoint written, not renamed", lambda: _kill_at(os, "replace", 1,
                                                         match=lambda src, dst: str(dst).endswith(checkpoint.NAME))),
    ("just after the checkpoint rename", lambda: _kill_at(os, "replace", 1, during=_after,
                                                          match=lambda src, dst: str(dst).endswith(checkpoint.NAME))),
    ("update of step 3", lambda: _kill_at(ppo_module(), "ppo_update", 1)),
    ("mid metrics rewrite on resume", lambda: _kill_at(run_io, "atomic_write_text", 1, match=_path_is("metrics.jsonl"),
                                                       during=lambda o, t, p, *a: _half_write(t, p))),
    ("mid config.yaml write on resume", lambda: _kill_at(run_io, "atomic_write_text", 1, match=_path_is("config.yaml"),
                                                         during=lambda o, t, p, *a: _half_write(t, p))),
    ("evaluation at step 4", lambda: _kill_at(pipeline_evaluate(), "generate_chunk", 2)),
    ("mid checkpoint write (step 4)", lambda: _kill_at(checkpoint, "atomic_write_bytes", 1,
                                                       during=lambda o, d, p: _half_write(d, p))),
    ("mid summary.json write", lambda: _kill_at(pipeline, "atomic_write_json", 1, match=_path_is("summary.json"),
                                                during=lambda o, obj, p, *a: _half_json(obj, p))),
    ("mid result.json write", lambda: _kill_at(run_dir, "atomic_write_json", 1, match=_path_is("result.json"),
                                               during=lambda o, obj, p, *a: _half_json(obj, p))),
]


def pipeline_evaluate():
    from rlhf_fast.rlhf import evaluate
    return evaluate


def ppo_module():
    from rlhf_fast.rlhf import ppo
    return ppo


def _launch(out: str, stages: tuple, kill: int | None) -> None:
    """In a forked child: the stages into `out` (resuming), killed at KILLS[kill] when given."""
    if kill is not None:
        KILLS[kill][1]()
    cfg = tiny(out, "cpu", **EXTRA)
    for stage in stages:
        getattr(pipeline, f"run_{stage}")(cfg, resume=True)


def _files(root) -> dict:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_ppo_killed_at_13_points_resumes_to_the_uninterrupted_run(tmp_path, device):
    if device.type != "cpu":
        pytest.skip("bitwise-equal metrics are the CPU guarantee")
    ctx = multiprocessing.get_context("forkserver")
    # what a launch imports lazily, imported once in the server (torch.optim pulls in torch._dynamo: seconds)
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "safetensors.torch", "yaml", "rlhf_fast.rlhf.pipeline",
                                "rlhf_fast.rlhf.sft", "rlhf_fast.rlhf.reward", "rlhf_fast.rlhf.ppo",
                                "rlhf_fast.rlhf.evaluate", __name__])

    def launch(out, stages, kill=None) -> int:
        proc = ctx.Process(target=_launch, args=(str(out), stages, kill))
        proc.start()
        proc.join(timeout=300)
        return proc.exitcode

    full, killed = tmp_path / "full", tmp_path / "killed"
    assert launch(full, ("sft", "rm")) == 0
    shutil.copytree(full, killed)
    assert launch(full, ("ppo",)) == 0
    for i, (what, _) in enumerate(KILLS):
        assert launch(killed, ("ppo",), i) == -signal.SIGKILL, f"kill point {i} ({what}) was never reached"
    assert launch(killed, ("ppo",)) == 0
    assert (killed / "ppo" / "metrics.jsonl").read_bytes() == (full / "ppo" / "metrics.jsonl").read_bytes()
    assert _files(killed) == _files(full)
    for name in ("result.json", "config.yaml"):
        assert (killed / "ppo" / name).is_file()
