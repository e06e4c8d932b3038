"""`--train.grad_accum=N`: N micro-batches per optimizer step give the gradient of one pass over the whole
batch (SFT, reward model, PPO's policy and value, GRPO), and a run stopped and resumed with accumulation
logs the metrics of the run that was never stopped.

The gradients are compared where each optimizer step takes them (the stage's clip_and_step), step by
step: both runs sum the same per-token terms, grouped differently, so they agree to fp32 rounding of those
sums. Adam would hide a wrongly scaled gradient (its update is nearly scale-free), the gradient does not;
and the parameters after AdamW differ by more than rounding where a gradient element is itself at rounding
level (its update g / (|g| + eps) then flips): measured, at most 2.6e-5 after the RM's two warmup steps
(lr 5e-5 and 1e-4), below 3e-7 elsewhere. So the gradients are what is compared, step by step.
"""
import copy
import shutil

import pytest
import torch

from rlhf_fast.rlhf import critic_free_trainer, pipeline, ppo, reward, sft
from rlhf_fast.rlhf.microbatch import grad_sync
from rlhf_fast.rlhf.rl_pipeline import run_rl
from rlhf_fast.rlhf.run_io import read_metrics

from .stop_after import Stop, stop_after
from .test_distributed import CLI, FSDP, _same_metrics, _torchrun
from .test_pipeline import tiny
from .test_rl import RL

STAGES = {"sft": (sft, "sft"), "rm": (reward, "rm"), "ppo": (ppo, "ppo"), "rl": (critic_free_trainer, "rl")}


def _tolerance(reference: torch.Tensor) -> float:
    """fp32 rounding of a regrouped sum: each element of the gradient sums at most a few hundred per-token
    terms (tiny batches); a regrouping moves such a sum by a few ulps of its largest terms, which are
    bounded by the largest element times the cancellation (measured: at most 8e-7 of the largest element).
    1e-5 of the largest element is ~80 ulps of it:
    far above rounding, far below a wrongly weighted micro-batch (a factor >= 1/N of the gradient)."""
    return 1e-5 * float(reference.abs().max())


def _grads_per_step(monkeypatch, module):
    """Record the flattened gradient of every model at each of `module`'s optimizer steps."""
    seen = []
    real = module.clip_and_step

    def recording(model, opt, *args, **kwargs):
        params = [p for p in model.parameters() if p.requires_grad]
        seen.append(torch.cat([p.grad.detach().flatten() if p.grad is not None else torch.zeros(p.numel())
                               for p in params]))
        return real(model, opt, *args, **kwargs)
    monkeypatch.setattr(module, "clip_and_step", recording)
    return seen


def _run(stage: str, out, device, monkeypatch, **extra):
    module, _ = STAGES[stage]
    with monkeypatch.context() as m:
        grads = _grads_per_step(m, module)
        cfg = tiny(out, device, **{**RL, "rl.algo": "grpo", "rl.reward_fn": f"{__name__}:length", **extra})
        {"sft": pipeline.run_sft, "rm": pipeline.run_rm, "ppo": pipeline.run_ppo, "rl": run_rl}[stage](cfg)
    return grads


def length(prompts, responses, **fields):
    """A reward that differs within a group, so every GRPO minibatch has a gradient."""
    return [float(len(r)) for r in responses]


@pytest.fixture(scope="module")
def sft_rm_run(tmp_path_factory, device):
    out = tmp_path_factory.mktemp("accum_base")
    cfg = tiny(out, device, **{**RL, "rl.algo": "grpo"})
    pipeline.run_sft(cfg)
    pipeline.run_rm(cfg)
    return out


@pytest.mark.parametrize("stage,accum", [("sft", 4), ("rm", 2), ("ppo", 2), ("rl", 4)])
def test_micro_batches_give_the_gradient_of_the_whole_batch(sft_rm_run, tmp_path, device, monkeypatch,
                                                            stage, accum):
    runs = {}
    for n in (1, accum):
        out = tmp_path / f"accum{n}"
        if stage in ("ppo", "rl"):
            shutil.copytree(sft_rm_run, out)
        elif stage == "rm":
            shutil.copytree(sft_rm_run, out, ignore=shutil.ignore_patterns("rm"))
        runs[n] = (out, _run(stage, out, device, monkeypatch, **{"train.grad_accum": n}))
    (one, whole), (many, micro) = runs[1], runs[accum]
    assert len(whole) == len(micro) > 0
    for step, (g1, gn) in enumerate(zip(whole, micro)):
        assert float(g1.abs().max()) > 0, step  # a gradient to compare
        err = float((gn - g1).abs().max())
        assert err <= _tolerance(g1), (stage, step, err, float(g1.abs().max()))
    _same_metrics(one, many, stage)  # losses, accuracies, grad norms, PPO/GRPO stats: the same up to rounding


@pytest.mark.parametrize("stage", ["sft", "ppo", "rl"])
def test_resume_with_accumulation_logs_what_an_unstopped_run_logs(sft_rm_run, tmp_path, device, stage):
    extra = {"train.grad_accum": 2, "rl.algo": "grpo", "rl.reward_fn": f"{__name__}:length"}
    runner = {"sft": pipeline.run_sft, "ppo": pipeline.run_ppo, "rl": run_rl}[stage]
    outs = []
    for name in ("full", "killed"):
        out = tmp_path / name
        if stage != "sft":
            shutil.copytree(sft_rm_run, out)
        outs.append(out)
    full, killed = outs
    runner(tiny(full, device, **{**RL, **extra}))
    with pytest.raises(Stop):
        runner(tiny(killed, device, **{**RL, **extra}), on_step=stop_after(2))
    runner(tiny(killed, device, **{**RL, **extra}), resume=True)
    a, b = (read_metrics(o / stage / "metrics.jsonl") for o in (killed, full))
    assert len(a) == len(b) >= 3
    if device.type == "cpu":  # bitwise equality is the CPU guarantee
        assert a == b
    else:
        _same_metrics(killed, full, stage)


def test_grad_accum_that_does_not_divide_the_batch_is_refused_naming_the_key(tmp_path, device):
    with pytest.raises(ValueError, match=r"train.grad_accum=3 must divide .*sft.batch_size \(16\)"):
        pipeline.run_sft(tiny(tmp_path / "x", device, **{"train.grad_accum": 3}))
    with pytest.raises(ValueError, match="train.grad_accum must be > 0"):
        tiny(tmp_path / "y", device, **{"train.grad_accum": 0})


@pytest.fixture(scope="module")
def ppo_without_accum(sft_rm_run, tmp_path_factory, device):
    """PPO in this process (1 rank), one micro-batch per minibatch: what the accumulating runs must log."""
    if device.type != "cpu":
        pytest.skip("the gloo equivalence tests run on CPU")
    out = tmp_path_factory.mktemp("ppo_one")
    shutil.copytree(sft_rm_run, out, dirs_exist_ok=True)
    pipeline.run_ppo(tiny(out, device))
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_accumulating_match_one_process_that_does_not(sft_rm_run, ppo_without_accum, tmp_path,
                                                                         device, mode):
    """DDP and FSDP2 reduce gradients in the last micro-batch only (no_sync, set_requires_gradient_sync(False)
    before): the sum is the same. An FSDP2 flag left off would leave the step without its reduced gradient."""
    two = tmp_path / "two"
    shutil.copytree(sft_rm_run, two)
    _torchrun(CLI, "ppo", two, device, "--train.grad_accum=2", *([FSDP] if mode == "fsdp" else []))
    _same_metrics(ppo_without_accum, two, "ppo")


@pytest.fixture
def one_rank_gloo(tmp_path):
    """A process group of this process alone, destroyed afterwards (the stages' runtime creates its own)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp2_reduce_scatters_only_in_the_last_micro_batch(one_rank_gloo):
    """Gradient sync off before the last micro-batch: no reduce-scatter writes the sharded .grad (FSDP2 keeps
    the sum unsharded); the last one's writes the sum of all three. A micro-batch that raises does not leave
    sync off: the next backward outside grad_sync writes .grad again."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    plain = torch.nn.Linear(4, 3)
    model = fully_shard(copy.deepcopy(plain), mesh=init_device_mesh("cpu", (1,)))
    xs = torch.randn(3, 2, 4)
    for i, x in enumerate(xs):
        with grad_sync(i == len(xs) - 1, model):
            model(x).square().sum().backward()
        plain(x).square().sum().backward()
        if i < len(xs) - 1:
            assert all(p.grad is None for p in model.parameters()), i
    for p, ref in zip(model.parameters(), plain.parameters()):
        got = p.grad.full_tensor()
        assert float((got - ref.grad).abs().max()) <= _tolerance(ref.grad)

    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="micro-batch failed"):
        with grad_sync(False, model):
            raise RuntimeError("micro-batch failed")
    model(xs[0]).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
