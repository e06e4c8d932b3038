"""A run directory is never lost or misrecorded: launches that fail validation leave it byte for byte,
a finished stage is replaced only with --overwrite, each stage records what it trained, and every
failure a user can cause ends in one line naming the thing (tiny model, in-process, seconds)."""
import json
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from rlhf_fast import cli
from rlhf_fast.rlhf import checkpoint, pipeline

from .test_pipeline import TINY, tiny


def _args(out, device, **extra) -> list[str]:
    return ["--out", str(out), f"--run.device={device}", *(f"--{k}={v}" for k, v in {**TINY, **extra}.items())]


def _snapshot(root: Path) -> dict:
    """Every file under `root` with its bytes and mtime: any write shows."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, device):
    """A finished tiny sft -> rm -> ppo run (never modified: tests copy it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    cfg = tiny(out, device)
    pipeline.run_sft(cfg)
    pipeline.run_rm(cfg)
    pipeline.run_ppo(cfg)
    return out


@pytest.fixture
def run(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


@pytest.fixture
def nan_reward(monkeypatch):
    module = types.ModuleType("nan_reward_mod")
    module.reward = lambda prompts, responses: [float("nan")] * len(prompts)
    monkeypatch.setitem(sys.modules, "nan_reward_mod", module)


def _main(argv, capsys) -> tuple[int, str]:
    rc = cli.main(argv)
    return rc, capsys.readouterr().err.strip()


def test_failed_launches_leave_a_finished_run_untouched(run, device, tmp_path, capsys, monkeypatch, nan_reward):
    before = _snapshot(run)
    bad_utf8 = tmp_path / "prompts.jsonl"
    bad_utf8.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "\xff\xfe"}\n')
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("ppo:\n  lr: 1e-4\n   kl_coef: 0.1\nrun:\n  seed: 1\n")  # line 3 is indented wrongly
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for package in ("tiktoken", "transformers"):  # not installed: `import <package>` raises ImportError
        monkeypatch.setitem(sys.modules, package, None)
    cases = [  # (extra argv, what the one-line error must say)
        (["--ppo.temperature=0"], "ppo.temperature must be > 0"),
        (["--overwrite", "--ppo.temperature=0"], "ppo.temperature must be > 0"),
        (["--ppo.reward_mode=sum", "--ppo.reward_fn=nan_reward_mod:reward"], "already holds a finished ppo"),
        (["--overwrite", f"--ppo.prompts={bad_utf8}"], f"{bad_utf8}:3: not UTF-8"),
        (["--overwrite", "--ppo.reward_mode=fn", "--ppo.reward_fn=no_such_module_xyz:f"], "cannot be loaded"),
        (["--overwrite", "--ppo.eval_prompts=x.jsonl"], "ppo.eval_prompts needs ppo.reward_fn"),
        (["--overwrite", "--run.device=tpu"], "run.device must be"),
        (["--overwrite", "--run.threads=-1"], "run.threads must be >= 0"),
        (["--overwrite", "--run.distributed=ddp"], "needs the processes torchrun starts"),
        (["--overwrite", "--run.backend=triton"], "run.backend='triton' cannot run"),
        (["--overwrite", "--run.tokenizer=tiktoken:gpt2"], "pip install 'rlhf_fast[tokenizers]'"),
        (["--overwrite", f"--run.tokenizer=hf:{tmp_path}"], "needs the transformers package"),
        (["--overwrite", f"--config={bad_yaml}"], f"{bad_yaml}:3: YAML syntax error"),
        (["--overwrite", "--ppo.policy_init=nowhere.safetensors"], "nowhere.safetensors' does not exist"),
    ]
    for extra, message in cases:
        rc, err = _main(["ppo", *_args(run, device), *extra], capsys)
        assert rc != 0 and message in err and len(err.splitlines()) == 1, (extra, err)
        assert _snapshot(run) == before, extra


def test_rerun_is_refused_and_overwrite_removes_later_stages(run, device, capsys):
    before = _snapshot(run)
    rc, err = _main(["sft", *_args(run, device)], capsys)
    assert rc == 1 and len(err.splitlines()) == 1
    assert "already holds a finished sft stage" in err and "--overwrite" in err and "new --out" in err
    assert _snapshot(run) == before
    # train SFT again, wider (64); the reward model and PPO were built on the old one: removed, and said so
    cfg = tiny(run, device, **{"model.n_embd": 64})
    pipeline.run_sft(cfg, overwrite=True)
    assert "--overwrite: moving aside" in capsys.readouterr().out
    assert not (run / "rm").exists() and not (run / "ppo").exists() and not (run / ".replaced").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert "rm_accuracy" not in summary and "task_score_ppo" not in summary and "task_score_sft" in summary
    # a plain `rm` (its config says n_embd 32) trains and records the architecture of the checkpoint it starts from
    pipeline.run_rm(tiny(run, device))
    pipeline.run_ppo(tiny(run, device, **{"ppo.steps": 1}))
    for config in ("sft/config.yaml", "rm/config.yaml", "ppo/config.yaml", "config.yaml"):
        assert "n_embd: 64" in (run / config).read_text(), config
    for stage, key in (("rm", "model"), ("ppo", "policy")):
        assert checkpoint.load(run / stage / checkpoint.NAME)[key]["config"]["n_embd"] == 64


def test_overwrite_that_fails_keeps_the_replaced_results(run, device, nan_reward, capsys):
    from rlhf_fast.rlhf.runtime import NonFiniteError
    old = (run / "ppo" / "metrics.jsonl").read_bytes()
    cfg = tiny(run, device, **{"ppo.reward_mode": "sum", "ppo.reward_fn": "nan_reward_mod:reward"})
    for attempt in range(2):  # a second failed attempt must not replace the results kept by the first
        with pytest.raises(NonFiniteError, match="ppo step 1: reward is not finite"):
            pipeline.run_ppo(cfg, overwrite=True)
        assert (run / ".replaced" / "ppo" / "metrics.jsonl").read_bytes() == old, attempt
    pipeline.run_ppo(tiny(run, device, **{"ppo.steps": 1}), overwrite=True)
    assert not (run / ".replaced").exists()


def test_unfinished_stage_needs_resume_or_overwrite(run, device, capsys):
    (run / "ppo" / "result.json").unlink()  # killed after its last checkpoint, before it finished
    rc, err = _main(["ppo", *_args(run, device)], capsys)
    assert rc == 1 and f"continue it with --resume {run}" in err


def test_demo_resume_of_a_finished_run_keeps_timings_and_removes_stale_temps(run, device, capsys):
    stale = [run / ".summary.json.x1.tmp", run / "ppo" / ".checkpoint.safetensors.x2.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    summary = (run / "summary.json").read_bytes()
    rc, err = _main(["demo", "--resume", str(run)], capsys)
    assert rc == 0, err
    assert (run / "summary.json").read_bytes() == summary
    assert not any(p.exists() for p in stale)


def test_output_files_follow_the_umask(tmp_path, device):
    old = os.umask(0o027)
    try:
        pipeline.run_sft(tiny(tmp_path / "run", device, **{"run.plots": "true", "sft.steps": 1}))
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in (tmp_path / "run").rglob("*")
             if p.is_file()}
    assert any(k.endswith(checkpoint.NAME) for k in modes) and any(k.endswith(".png") for k in modes)
    assert set(modes.values()) == {"0o640"}, modes


def test_corrupt_or_unsafe_checkpoints_are_named(run, device, capsys):
    (run / "ppo" / "result.json").unlink()  # an unfinished stage, whose checkpoint a crash cut short
    path = run / "ppo" / checkpoint.NAME
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    rc, err = _main(["ppo", "--resume", str(run)], capsys)
    assert rc == 1 and str(path) in err and "truncated" in err and len(err.splitlines()) == 1
    path.write_bytes(b"\x07")
    with pytest.raises(checkpoint.CheckpointError, match="is truncated"):
        checkpoint.load(path)
    # the pickle format of older versions is read with weights_only=True: arbitrary objects are refused
    legacy = run / "old.pt"
    torch.save({"model": {"weights": {}}, "hook": types.SimpleNamespace(x=1)}, legacy)
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read safely"):
        checkpoint.load(legacy)


def test_checkpoint_round_trip_keeps_structure_and_values(tmp_path):
    w = torch.randn(5, 3)
    state = {"model": {"weights": {"a": w, "tied": w}, "config": {"n_layer": 1, "bias": True, "eps": 1e-5}},
             "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(7)}},
                           "param_groups": [{"params": [0], "betas": (0.9, 0.95), "foreach": None}]},
             "rng": {"python": (3, tuple(range(5)), None), "torch": torch.get_rng_state()},
             "loss": float("nan"), "step": 4, "__odd": "key"}
    back = checkpoint.load(checkpoint.save(state, tmp_path / "c.safetensors"))
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95) and 0 in back["optimizer"]["state"]
    assert back["rng"]["python"] == (3, (0, 1, 2, 3, 4), None) and back["__odd"] == "key" and back["step"] == 4
    assert back["loss"] != back["loss"]  # NaN survives
    for got, want in ((back["model"]["weights"]["tied"], w), (back["optimizer"]["state"][0]["step"], torch.tensor(3.0)),
                      (back["rng"]["torch"], state["rng"]["torch"])):
        assert torch.equal(got, want) and got.dtype == want.dtype
    assert checkpoint.read_meta(tmp_path / "c.safetensors")["model"]["config"] == state["model"]["config"]
    assert os.listdir(tmp_path) == ["c.safetensors"]


@pytest.mark.parametrize("returned, what", [
    (None, "returned None (NoneType)"), (1.5, "returned 1.5 (float)"), (["1", "2", "3"], "holding '1' (str)"),
    (torch.ones(3, 1), "returned a (3, 1) torch.float32 tensor"), ([1.0, 2.0], "returned 2 values for 3 responses"),
])
def test_reward_function_output_is_checked(returned, what):
    from rlhf_fast.rlhf.reward_fns import call_reward_fn

    def my_reward(prompts, responses):
        return returned
    with pytest.raises(ValueError, match="my_reward") as info:
        call_reward_fn(my_reward, ["a", "b", "c"], ["x", "y", "z"])
    assert what in str(info.value)
    good = call_reward_fn(lambda p, r: torch.tensor([1, 2, 3]), ["a"] * 3, ["x"] * 3)
    assert good.tolist() == [1.0, 2.0, 3.0]


def test_nan_message_shows_the_non_finite_values():
    from rlhf_fast.rlhf.runtime import NonFiniteError, check_finite
    with pytest.raises(NonFiniteError) as info:
        check_finite("ppo", 1, reward=torch.tensor([0.5, 1.0, 2.0, 3.0, float("nan"), 4.0, float("-inf")]))
    assert "2 of 7 values: [4]=nan, [6]=-inf" in str(info.value)


def test_reward_fn_module_in_the_working_directory(tmp_path, monkeypatch):
    from rlhf_fast.rlhf.reward_fns import load_function
    (tmp_path / "my_local_reward.py").write_text("def score(prompts, responses):\n    return [1.0] * len(prompts)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_function("my_local_reward:score")(["a"], ["b"]) == [1.0]


def test_unwritable_out_and_ctrl_c_are_one_line(tmp_path, device, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    rc, err = _main(["sft", *_args(tmp_path / "file" / "run", device)], capsys)
    assert rc == 1 and "is a file, not a directory" in err and len(err.splitlines()) == 1
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    rc, err = _main(["sft", *_args(tmp_path / "ro" / "run", device)], capsys)
    assert rc == 1 and "is not writable" in err
    monkeypatch.undo()

    def denied(cfg, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "sft" / "metrics.jsonl"))
    monkeypatch.setattr(pipeline, "run_sft", denied)
    rc, err = _main(["sft", *_args(tmp_path / "run", device)], capsys)
    assert rc == 1 and err == f"rlhf-fast sft: error: Permission denied: {tmp_path / 'run' / 'sft' / 'metrics.jsonl'}"

    def interrupted(cfg, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "run_sft", interrupted)
    rc, err = _main(["sft", *_args(tmp_path / "run", device)], capsys)
    assert rc == 130 and err == f"rlhf-fast sft: interrupted; continue with: rlhf-fast sft --resume {tmp_path / 'run'}"


def test_sample_prints_the_policy_answer(finished, capsys):
    from rlhf_fast.rlhf.answer import answer
    from rlhf_fast.rlhf.runtime import load_model
    from rlhf_fast.rlhf.tokenizer import ByteTokenizer
    assert cli.main(["sample", str(finished), "--prompt", "sort:31=", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    # greedy decoding by hand with the PPO policy's plain forward pass (argmax of the full logits)
    policy = load_model(checkpoint.load(finished / "ppo" / checkpoint.NAME)["policy"], torch.device("cpu")).eval()
    tok = ByteTokenizer()
    ids = [tok.bos_id, *tok.encode("sort:31=")]
    vocab = torch.arange(tok.vocab_size)
    out = []
    with torch.no_grad():
        for _ in range(5):
            x = torch.tensor([ids]).expand(tok.vocab_size, -1)
            targets = torch.full_like(x, -100)
            targets[:, -1] = vocab  # the logprob of every candidate next token
            logprobs, _ = policy(x, targets, return_entropy=False)
            nxt = int(logprobs[:, -1].argmax())
            if nxt == tok.eos_id:
                break
            ids.append(nxt)
            out.append(nxt)
    assert printed == tok.decode(out) + "\n"
    assert answer(finished, "sort:31=", "sft", temperature=0) == answer(finished, "sort:31=", "sft", temperature=0)
    assert cli.main(["sample", str(finished), "--prompt", "x", "--stage", "sft", "--max_new_tokens", "0"]) == 1


def test_export_says_in_one_line_when_the_stage_is_missing_or_unfinished(run, tmp_path, capsys):
    from rlhf_fast.model import GPT
    hf = tmp_path / "hf"
    (run / "ppo" / "result.json").unlink()
    rc, err = _main(["export", str(run), "--out", str(hf)], capsys)
    assert rc == 1 and err == (f"rlhf-fast export: error: the ppo stage of {run} is unfinished (no result.json): "
                               f"finish it with `rlhf-fast ppo --resume {run}`")
    shutil.rmtree(run / "rm")
    rc, err = _main(["export", str(run), "--stage", "rm", "--out", str(hf)], capsys)
    assert rc == 1 and err == (f"rlhf-fast export: error: {run} has no rm checkpoint ({run / 'rm' / checkpoint.NAME}): "
                               f"train the stage first (rlhf-fast rm --out {run})")
    assert not hf.exists()
    # an older run's checkpoint.pt, from before stages recorded their end, exports (read with weights_only)
    state = checkpoint.load(run / "sft" / checkpoint.NAME)
    torch.save(state, run / "sft" / checkpoint.LEGACY_NAME)
    (run / "sft" / checkpoint.NAME).unlink()
    (run / "sft" / "result.json").unlink()
    assert cli.main(["export", str(run), "--stage", "sft", "--out", str(hf)]) == 0
    back = GPT.from_pretrained(hf).state_dict()
    assert all(torch.equal(back[k], v) for k, v in state["model"]["weights"].items())


def test_a_batch_larger_than_the_data_is_refused_before_the_run_directory_exists(tmp_path, device, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"sort:{n}=", "response": str(n)}) + "\n" for n in (31, 97, 4)))
    out = tmp_path / "run"
    code, err = _main(["sft", *_args(out, device, **{"sft.data": data, "sft.batch_size": 4})], capsys)
    assert code == 1 and "sft.batch_size=4 is larger than" in err and "(3 examples)" in err
    assert not out.exists()
