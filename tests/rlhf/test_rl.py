"""The `rl` stage's critic-free algorithms end to end on a tiny model (seconds each): outputs and metrics,
advantages against a by-definition float64 loop, the reward-function contract, resume after a stop,
and 2 gloo processes against 1."""
import json
import math
import shutil
import statistics

import pytest
import torch

from rlhf_fast.rlhf import checkpoint, pipeline
from rlhf_fast.rlhf.critic_free_trainer import advantages, resolve
from rlhf_fast.rlhf.data import BatchSampler
from rlhf_fast.rlhf.reward_fns import RewardFunctions
from rlhf_fast.rlhf.rl_pipeline import run_rl
from rlhf_fast.rlhf.rollout import Rollout
from rlhf_fast.rlhf.run_io import read_metrics
from rlhf_fast.rlhf.runtime import NonFiniteError

from .stop_after import Stop, stop_after
from .test_distributed import _same_metrics, _torchrun
from .test_pipeline import tiny

RL = {"rl.steps": 4, "rl.rollout_batch_size": 4, "rl.gen_batch_size": 2, "rl.group_size": 4, "rl.minibatch_size": 8,
      "rl.max_new_tokens": 5, "rl.eval_every": 2, "rl.ckpt_every": 2}
UPDATE_KEYS = ("pg_loss", "entropy", "approx_kl", "clipfrac", "clipfrac_low", "clipfrac_high")
ROLLOUT_KEYS = ("reward_mean", "reward_std", "groups_all_equal", "unscored", "response_len", "task_score_rollout")


def rl_cfg(out, device, algo="grpo", **extra):
    return tiny(out, device, **{**RL, "rl.algo": algo, **extra})


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, device):
    out = tmp_path_factory.mktemp("sft")
    pipeline.run_sft(rl_cfg(out, device))
    return out


def copy_of(sft_run, tmp_path, name="run"):
    out = tmp_path / name
    shutil.copytree(sft_run, out)
    return out


def test_demo_algo_grpo_writes_the_ppo_demo_summary_keys(tmp_path, device):
    out = tmp_path / "demo"
    summary = pipeline.run_demo(rl_cfg(out, device))
    for key in ("task_score_sft", "task_score_ppo", "rm_accuracy", "kl_final", "seconds"):
        assert key in summary, key
    assert summary["rm_accuracy"] is None and summary["algo"] == "grpo"
    assert summary["task_score_ppo"] == summary["task_score_rl"] is not None
    assert summary["task_score_sft"] == read_metrics(out / "rl" / "metrics.jsonl")[0]["task_score"]
    assert not (out / "rm").exists() and not (out / "ppo").exists()  # no reward model, no PPO
    rows = read_metrics(out / "rl" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in rows if "task_score" in r] == [0, 2, 4]
    for key in UPDATE_KEYS + ROLLOUT_KEYS + ("kl", "kl_loss"):
        assert all(key in r for r in rows[1:]), key
    ckpt = checkpoint.load(out / "rl" / checkpoint.NAME)
    assert ckpt["step"] == 4 and set(ckpt) >= {"policy", "optimizer", "sampler"}


@pytest.mark.parametrize("algo", ["dr_grpo", "rloo", "reinforce_pp"])
def test_each_algorithm_runs_and_logs_its_kl_where_it_belongs(sft_run, tmp_path, device, algo):
    out = copy_of(sft_run, tmp_path)
    run_rl(rl_cfg(out, device, algo, **{"rl.steps": 2}))
    rows = read_metrics(out / "rl" / "metrics.jsonl")[1:]
    assert len(rows) == 2 and all(k in rows[-1] for k in UPDATE_KEYS + ROLLOUT_KEYS + ("kl",))
    assert ("kl_loss" in rows[-1]) == (resolve(rl_cfg(out, device, algo).rl)["kl_in"] == "loss")


def test_kl_coef_zero_loads_no_reference(sft_run, tmp_path, device, monkeypatch):
    out = copy_of(sft_run, tmp_path)
    from rlhf_fast.rlhf import rl_pipeline
    loads = []
    real = rl_pipeline.load_model
    monkeypatch.setattr(rl_pipeline, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    run_rl(rl_cfg(out, device, **{"rl.kl_coef": 0, "rl.steps": 1}))
    assert len(loads) == 1  # the policy only: no reference, no reward model
    row = read_metrics(out / "rl" / "metrics.jsonl")[-1]
    assert "kl" not in row and "kl_loss" not in row


def _rollout(scores, kl, mask):
    B, T = mask.shape
    z = torch.zeros(B, T, dtype=torch.float64)
    return Rollout(torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.long), mask, kl, z, z,
                   scores, torch.full((B,), math.nan), torch.ones(B))


@pytest.mark.parametrize("algo", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_advantages_match_a_float64_loop(device, algo):
    """The trainer's composition (KL placement, baseline, scale) on random odd-sized input, row by row."""
    G, n_groups, T, beta = 3, 3, 7, 0.1
    B = G * n_groups
    g = torch.Generator().manual_seed(5)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[:, 0] = 1
    kl = torch.randn(B, T, generator=g, dtype=torch.float64) * mask  # ref_logprobs 0: kl_per_token k1 = logprobs
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    scores[4] = math.nan  # unscored: out of its group's baseline, advantage 0
    c = rl_cfg("unused", device, algo, **{"rl.group_size": G, "rl.kl_coef": beta, "rl.minibatch_size": 4}).rl
    preset = resolve(c)
    _, got = advantages(_rollout(scores, kl, mask), c, preset)
    valid = [not math.isnan(s) for s in scores.tolist()]
    want = torch.zeros(B, T, dtype=torch.float64)
    if algo == "reinforce_pp":  # returns of (score at the last token - beta * kl), whitened over valid tokens
        for b in range(B):
            last = max(t for t in range(T) if mask[b, t])
            r = [(-beta * float(kl[b, t])) + (float(scores[b]) if t == last and valid[b] else 0.0) for t in range(T)]
            run = 0.0
            for t in reversed(range(T)):
                run = run + r[t] if mask[b, t] else 0.0
                want[b, t] = run
        toks = [float(want[b, t]) for b in range(B) for t in range(T) if valid[b] and mask[b, t]]
        mu, sd = statistics.fmean(toks), statistics.stdev(toks)
        want = torch.tensor([[(float(want[b, t]) - mu) / (sd + 1e-8) if valid[b] and mask[b, t] else 0.0
                              for t in range(T)] for b in range(B)], dtype=torch.float64)
    else:
        seq = [float(scores[b]) - (beta * float(kl[b].sum()) if preset["kl_in"] == "reward" else 0.0)
               for b in range(B)]
        for b in range(B):
            group = [i for i in range(b - b % G, b - b % G + G) if valid[i]]
            if not valid[b]:
                continue
            others = [seq[i] for i in group if i != b] if preset["leave_one_out"] else [seq[i] for i in group]
            a = seq[b] - statistics.fmean(others)
            if preset["scale"] == "group":
                a /= statistics.stdev([seq[i] for i in group]) + 1e-4
            want[b] = a * mask[b]
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
    assert got[4].abs().sum() == 0


def fields_echo(prompts, responses, *, answer, level):
    """A reward function of the JSONL fields: None (unscorable) where level is "skip"."""
    return [None if lv == "skip" else float(a == r) + len(p) * 0.0 for p, r, a, lv in
            zip(prompts, responses, answer, level)]


def length(prompts, responses, **fields):
    return [float(len(r)) for r in responses]


def test_reward_functions_get_fields_weights_and_none():
    rf = RewardFunctions(f"{__name__}:fields_echo, {__name__}:length", "2,0.5")
    rows = [{"prompt": "p", "answer": "12", "level": "a"}, {"prompt": "q", "answer": "3", "level": "skip"},
            {"prompt": "r", "answer": "45"}]
    got = rf(["p", "q", "r"], ["12", "3", "4"], rows)
    assert got[0] == 2 * 1.0 + 0.5 * 2 and math.isnan(got[1]) and got[2] == 0.5 * 1  # level None: scored
    with pytest.raises(ValueError, match="reward_weights"):
        RewardFunctions(f"{__name__}:length", "1,2")
    with pytest.raises(ValueError, match="cannot be loaded"):
        RewardFunctions("rlhf_fast.nope:fn")
    bad = RewardFunctions(f"{__name__}:length")
    for returned in ([0.5, math.nan], torch.tensor([0.5, math.inf])):  # NaN means "cannot score": not a score
        bad.fns = [lambda p, r, returned=returned: returned]
        with pytest.raises(ValueError, match=r"returned (nan|inf) for response 1; expected a finite number"):
            bad(["p", "q"], ["x", "y"], [{"prompt": "p"}, {"prompt": "q"}])
    bad.fns = [lambda p, r: []]
    with pytest.raises(ValueError, match="returned 0 values for 1 responses; .* or None for a response it cannot"):
        bad(["p"], ["x"], [{"prompt": "p"}])
    bad.fns = [lambda p, r: torch.tensor([2.0, 3.0])]  # a 1-D tensor is as good as a list
    assert bad(["p", "q"], ["x", "y"], [{"prompt": "p"}, {"prompt": "q"}]).tolist() == [2.0, 3.0]


def unscorable_odd_answers(prompts, responses, *, answer):
    """None for prompts whose reference answer has an odd digit sum."""
    return [None if sum(map(int, a)) % 2 else float(r == a) for r, a in zip(responses, answer)]


def test_unscored_responses_are_counted(sft_run, tmp_path, device):
    out = copy_of(sft_run, tmp_path)
    cfg = rl_cfg(out, device, **{"rl.steps": 1, "rl.reward_fn": f"{__name__}:unscorable_odd_answers"})
    run_rl(cfg)
    prompts = [json.loads(line) for line in (out / "data" / "prompts.jsonl").read_text().splitlines()]
    batch = BatchSampler(len(prompts), cfg.rl.rollout_batch_size, cfg.run.seed).next()  # the first step's prompts
    odd = sum(sum(map(int, prompts[i]["answer"])) % 2 for i in batch)
    assert 0 < odd < len(batch)
    assert read_metrics(out / "rl" / "metrics.jsonl")[-1]["unscored"] == odd * cfg.rl.group_size


def test_resume_after_stop_matches_uninterrupted(sft_run, tmp_path, device):
    full, killed = copy_of(sft_run, tmp_path, "full"), copy_of(sft_run, tmp_path, "killed")
    run_rl(rl_cfg(full, device))
    with pytest.raises(Stop):  # after step 3's update, before its checkpoint (ckpt_every=2): resuming redoes 3
        run_rl(rl_cfg(killed, device), on_step=stop_after(3))
    assert checkpoint.load(killed / "rl" / checkpoint.NAME)["step"] == 2
    run_rl(rl_cfg(killed, device), resume=True)
    a, b = read_metrics(killed / "rl" / "metrics.jsonl"), read_metrics(full / "rl" / "metrics.jsonl")
    if device.type != "cpu":  # bitwise equality is the CPU guarantee
        assert len(a) == len(b)
        return
    assert a == b
    # through the CLI: `rlhf-fast rl --resume DIR` continues a stopped run from its checkpoint, with its saved config
    from rlhf_fast.cli import main
    with pytest.raises(Stop):  # a finished stage is trained again only when asked to
        run_rl(rl_cfg(killed, device, **{"rl.steps": 6}), on_step=stop_after(5), overwrite=True)
    assert main(["rl", "--resume", str(killed)]) == 0
    c = read_metrics(killed / "rl" / "metrics.jsonl")
    assert [r["step"] for r in c] == [0, 1, 2, 3, 4, 5, 6] and c[:5] == b[:5]


def test_two_gloo_processes_match_one(sft_run, tmp_path, device):
    if device.type != "cpu":
        pytest.skip("the gloo equivalence tests run on CPU")
    one, two = copy_of(sft_run, tmp_path, "one"), copy_of(sft_run, tmp_path, "two")
    run_rl(rl_cfg(one, device))
    _torchrun(["-m", "rlhf_fast"], "rl", two, device, *[f"--{k}={v}" for k, v in {**RL, "rl.algo": "grpo"}.items()])
    _same_metrics(one, two, "rl")


def test_cli_rl_stage_and_demo_algo_flag():
    from rlhf_fast.cli import parse
    stage, cfg, _, overwrite = parse(["demo", "--algo", "rloo", "--out", "x", "--overwrite"])
    assert stage == "demo" and cfg.rl.algo == "rloo" and overwrite
    stage, cfg, _, _ = parse(["rl", "--rl.algo=dr_grpo", "--rl.clip_range_high=0.28", "--rl.loss_agg=token_mean"])
    assert (stage, cfg.rl.algo, cfg.rl.clip_range_high, cfg.rl.loss_agg) == ("rl", "dr_grpo", 0.28, "token_mean")
    with pytest.raises(SystemExit):
        parse(["demo", "--algo", "ppo2"])
    with pytest.raises(ValueError, match="rl.group_size must be >= 2"):
        parse(["rl", "--rl.algo=grpo", "--rl.group_size=1"])
    with pytest.raises(ValueError, match="rl.dual_clip"):
        parse(["rl", "--rl.dual_clip=0.5"])


def test_own_prompts_without_reward_fn_use_the_reward_model(sft_run, tmp_path, device, monkeypatch):
    out = copy_of(sft_run, tmp_path)
    pipeline.run_rm(rl_cfg(out, device))
    from rlhf_fast.rlhf import rl_pipeline, runtime
    loads = []
    real = runtime.load_model

    def spy(*a, **k):
        loads.append(a[0]["head"])
        return real(*a, **k)
    monkeypatch.setattr(rl_pipeline, "load_model", spy)
    monkeypatch.setattr(runtime, "load_model", spy)  # the reference is loaded through lora_stage
    run_rl(rl_cfg(out, device, "rloo", **{"rl.prompts": str(out / "data" / "prompts.jsonl"), "rl.reward_init": "rm",
                                          "rl.steps": 1}))
    assert loads == ["lm", "lm", "reward"]  # policy, reference, reward model
    row = read_metrics(out / "rl" / "metrics.jsonl")[-1]
    assert "task_score_rollout" not in row and row["reward_std"] > 0  # scored by the model, not the task
    with pytest.raises(ValueError, match="rl.reward_fn"):
        run_rl(rl_cfg(out, device, **{"rl.prompts": str(out / "data" / "prompts.jsonl")}), overwrite=True)
    assert (out / "rl" / "result.json").is_file()  # refused before --overwrite set anything aside


def test_own_eval_prompts_are_scored_by_the_reward_functions_with_their_fields(sft_run, tmp_path, device):
    out = copy_of(sft_run, tmp_path)
    data = out / "data"
    run_rl(rl_cfg(out, device, **{"rl.prompts": str(data / "prompts.jsonl"),
                                  "rl.eval_prompts": str(data / "eval_prompts.jsonl"),
                                  "rl.reward_fn": "rlhf_fast.rlhf.task:answer_reward", "rl.steps": 2}))
    builtin = copy_of(sft_run, tmp_path, "builtin")  # the same prompts as the built-in task: the same scores
    run_rl(rl_cfg(builtin, device, **{"rl.steps": 2}))
    a, b = read_metrics(out / "rl" / "metrics.jsonl"), read_metrics(builtin / "rl" / "metrics.jsonl")
    assert [r.get("task_score") for r in a] == [r.get("task_score") for r in b]
    assert a[0]["task_score"] is not None


def test_algo_ppo_runs_the_ppo_stage(tmp_path, device, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "run_ppo", lambda cfg, resume=False, on_step=None, overwrite=False:
                        calls.append((resume, overwrite)) or {})
    run_rl(rl_cfg(tmp_path, device, "ppo"), resume=True)
    run_rl(rl_cfg(tmp_path, device, "ppo"), overwrite=True)
    assert calls == [(True, False), (False, True)] and not (tmp_path / "rl").exists()


def test_nan_reward_model_score_stops_the_run(sft_run, tmp_path, device, monkeypatch):
    """NaN marks an unscored response only when a reward function returns None; from a model it is an error."""
    out = copy_of(sft_run, tmp_path)
    pipeline.run_rm(rl_cfg(out, device))
    from rlhf_fast.rlhf import rl_pipeline
    real = rl_pipeline.load_model

    def load_model(state, device, *args, **kwargs):
        model = real(state, device, *args, **kwargs)
        if state["head"] == "reward":
            model.forward = lambda seqs, attention_mask=None: torch.full(seqs.shape[:1], math.nan)
        return model
    monkeypatch.setattr(rl_pipeline, "load_model", load_model)
    with pytest.raises(NonFiniteError, match=r"rl step 1: reward is not finite \(16 of 16 values: \[0\]=nan, "):
        run_rl(rl_cfg(out, device, **{"rl.prompts": str(out / "data" / "prompts.jsonl"), "rl.reward_init": "rm"}))
    assert not (out / "rl" / checkpoint.NAME).exists()


@pytest.fixture(scope="module")
def finished_rl(sft_run, tmp_path_factory, device):
    """A finished tiny sft -> grpo run (never modified: tests copy it)."""
    out = tmp_path_factory.mktemp("rl") / "run"
    shutil.copytree(sft_run, out)
    run_rl(rl_cfg(out, device, **{"rl.steps": 2}))
    return out


def test_failed_rl_launches_leave_a_finished_run_untouched(finished_rl, tmp_path, device, capsys, monkeypatch):
    from rlhf_fast import cli

    from .test_run_safety import _args, _main, _snapshot
    run = copy_of(finished_rl, tmp_path)
    assert (run / "rl" / "result.json").is_file() and (run / "rl" / "config.yaml").is_file()
    before = _snapshot(run)
    bad_utf8 = tmp_path / "prompts.jsonl"
    bad_utf8.write_bytes(b'{"prompt": "a", "answer": "a"}\n{"prompt": "\xff"}\n')
    own = str(run / "data" / "prompts.jsonl")
    rl_args = _args(run, device, **{**RL, "rl.algo": "grpo", "rl.steps": 2})
    cases = [  # (argv, what the one-line error must say)
        (["rl", *rl_args], "already holds a finished rl stage"),
        (["demo", "--algo", "grpo", *rl_args], "already holds a finished sft stage"),
        (["rl", *rl_args, "--rl.temperature=0"], "rl.temperature must be > 0"),
        (["rl", *rl_args, "--overwrite", "--rl.reward_fn=no_such_module_xyz:f"], "cannot be loaded"),
        (["rl", *rl_args, "--overwrite", f"--rl.prompts={bad_utf8}", f"--rl.reward_fn={__name__}:length"],
         f"{bad_utf8}:2: not UTF-8"),
        (["rl", *rl_args, "--overwrite", f"--rl.prompts={own}"], "own prompts need rl.reward_fn"),
        (["rl", *rl_args, "--overwrite", f"--rl.prompts={own}", f"--rl.eval_prompts={own}", "--rl.reward_init=rm"],
         "rl.eval_prompts needs rl.reward_fn"),
        (["rl", *rl_args, "--overwrite", f"--rl.prompts={own}", "--rl.reward_init=rm"], "needs this run's rm stage"),
        (["rl", *rl_args, "--overwrite", "--rl.policy_init=nowhere.safetensors"],
         "nowhere.safetensors' does not exist"),
        (["rl", *rl_args, "--resume", str(run), "--overwrite"], "pass one of them"),
    ]
    for argv, message in cases:
        rc, err = _main(argv, capsys)
        assert rc != 0 and message in err and len(err.splitlines()) == 1, (argv, err)
        assert _snapshot(run) == before, argv
    rc, err = _main(["rl", "--resume", str(run)], capsys)  # finished: nothing to do, nothing written
    assert rc == 0 and _snapshot(run) == before
    # the rl policy answers through `sample --stage rl`, reading the run without writing to it
    assert cli.main(["sample", str(run), "--stage", "rl", "--prompt", "sort:31=", "--temperature", "0"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 and _snapshot(run) == before

    def interrupted(cfg, **kwargs):
        raise KeyboardInterrupt
    from rlhf_fast.rlhf import rl_pipeline
    monkeypatch.setattr(rl_pipeline, "run_rl", interrupted)
    rc, err = _main(["rl", *rl_args], capsys)
    assert rc == 130 and err == f"rlhf-fast rl: interrupted; continue with: rlhf-fast rl --resume {run}"


def nan_reward(prompts, responses, **fields):
    return [math.nan] * len(responses)


def test_rl_overwrite_keeps_the_old_stage_until_the_new_one_finishes(finished_rl, tmp_path, device):
    from rlhf_fast.rlhf.run_dir import built_on
    run = copy_of(finished_rl, tmp_path)
    assert built_on(run, "sft") == ["sft", "rl"] and built_on(run, "rl") == ["rl"]  # from rl/config.yaml
    old = (run / "rl" / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"returned nan for response 0"):
        run_rl(rl_cfg(run, device, **{"rl.reward_fn": f"{__name__}:nan_reward"}), overwrite=True)
    assert (run / ".replaced" / "rl" / "metrics.jsonl").read_bytes() == old
    assert not (run / "rl" / "result.json").exists()
    run_rl(rl_cfg(run, device, **{"rl.steps": 1}), overwrite=True)
    assert not (run / ".replaced").exists() and len(read_metrics(run / "rl" / "metrics.jsonl")) == 2
    assert "steps: 1" in (run / "rl" / "config.yaml").read_text()
    assert json.loads((run / "rl" / "result.json").read_text())["algo"] == "grpo"


class _Peer:
    """all_reduce_sum as seen by rank 0 of two: its own value plus rank 1's, given in call order."""

    def __init__(self, contributions):
        self.contributions = list(contributions)

    def all_reduce_sum(self, x):
        return x + self.contributions.pop(0)


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "seq_mean_token_sum_norm", "token_mean"])
def test_update_stats_combine_ranks_as_one_process(agg):
    """Two ranks' minibatch halves with different response lengths: the logged pg_loss equals the loss of
    the whole minibatch under its own aggregation (weights: sequences or tokens), and token means (entropy)
    the whole minibatch's token mean."""
    from rlhf_fast.rlhf import aggregate_loss, masked_mean
    from rlhf_fast.rlhf.ppo import UpdateStats
    g = torch.Generator().manual_seed(7)
    loss = torch.randn(6, 9, generator=g, dtype=torch.float64)
    ent = torch.rand(6, 9, generator=g, dtype=torch.float64)
    lengths = torch.tensor([9, 1, 4, 7, 2, 9])
    mask = (torch.arange(9) < lengths[:, None]).double()
    halves = (slice(0, 2), slice(2, 6))  # rank 0 holds 2 rows (10 tokens), rank 1 holds 4 (22 tokens)
    part = [(aggregate_loss(loss[h], mask[h], agg, max_len=9), masked_mean(ent[h], mask[h]), mask[h].sum(),
             torch.tensor(float(mask[h].shape[0]), dtype=torch.float64)) for h in halves]
    (l0, e0, t0, s0), (l1, e1, t1, s1) = part
    n0, n1 = (t0, t1) if agg == "token_mean" else (s0, s1)
    stats = UpdateStats(_Peer([l1 * n1, e1 * t1]))
    stats.add({"pg_loss": l0, "entropy": e0}, t0, t0 + t1, loss_n=(n0, n0 + n1))
    got = stats.means()
    # UpdateStats sums in float32 (the losses are float32 in training): one float32 rounding each
    assert got["pg_loss"] == pytest.approx(float(aggregate_loss(loss, mask, agg, max_len=9)), rel=1e-6)
    assert got["entropy"] == pytest.approx(float(masked_mean(ent, mask)), rel=1e-6)


def test_rl_policy_exports_as_a_transformers_model(finished_rl, tmp_path):
    """`rlhf-fast export --stage rl`: the critic-free stage's policy, loaded back by transformers, gives the
    logits of the checkpoint's model."""
    transformers = pytest.importorskip("transformers")
    from rlhf_fast.cli import main
    from rlhf_fast.rlhf.runtime import load_model
    assert main(["export", str(finished_rl), "--stage", "rl", "--out", str(tmp_path / "hf")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").double().eval()
    policy = load_model(checkpoint.load(finished_rl / "rl" / checkpoint.NAME)["policy"], torch.device("cpu")).eval()
    idx = torch.randint(0, policy.config.vocab_size, (2, 17))
    with torch.no_grad():
        want = back(idx).logits
        assert float((policy(idx).double() - want).abs().max() / want.abs().max()) < 1e-4


def test_group_rollout_stops_at_a_chat_templates_end_of_turn():
    """As PPO's rollout: responses end at EOS or at the chat template's end-of-turn id (tok.stop_ids), and
    a response that ends with either counts as having EOS (no missing-EOS penalty)."""
    import types

    from rlhf_fast.model.generate import GenerationOutput
    from rlhf_fast.rlhf.critic_free_trainer import make_group_rollout
    seen = {}

    class Policy:
        def generate(self, idx, n, **kw):
            seen.update(kw)
            tokens = torch.tensor([[5, 3, 0], [5, 6, 7]])  # row 0 ends with end-of-turn 3, row 1 never stops
            mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
            return GenerationOutput(tokens, torch.zeros(2, 3), mask, idx.repeat_interleave(2, 0),
                                    torch.ones(2, idx.shape[1], dtype=torch.long))

    tok = types.SimpleNamespace(pad_id=0, eos_id=2, bos_id=1, stop_ids=(2, 3), decode=lambda ids: str(ids))
    c = types.SimpleNamespace(group_size=2, max_new_tokens=3, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                              logprob_space="filtered", kl_kind="k1", missing_eos_penalty=1.0)
    rewards = lambda prompts, responses, rows: torch.zeros(len(responses))  # noqa: E731
    b = make_group_rollout({"policy": Policy(), "ref": None}, [[1, 4]], [{"prompt": "p"}], 2, tok, c, 0,
                           torch.device("cpu"), rewards=rewards)
    assert seen["eos_token_id"] == [2, 3]
    assert b.has_eos.tolist() == [1.0, 0.0] and b.scores.tolist() == [0.0, -1.0]
