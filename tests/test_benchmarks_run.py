"""The benchmarks' measured functions still run against today's API, at toy sizes (bench_ppo_step had stopped
running when the rollout started reading tokenizer stop ids, and nothing noticed). Correctness is the other
tests' job: these check that each phase runs and returns the fields the tables print."""
import math

import torch

from benchmarks import bench_filtered_logprobs, bench_ppo_step

TINY = dict(n_layer=1, n_head=2, n_embd=16, vocab_size=37)


def test_ppo_step_phases_run(device):
    phases = bench_ppo_step.our_phases(TINY, 2, 3, 4, None, device.type, "reference", reps=1, epochs=2)
    assert set(phases) == {"generation", "scoring", "training"}
    for seconds, peak in phases.values():
        assert 0 < seconds < 60 and (math.isnan(peak) or peak > 0)


def test_filtered_logprobs_inputs_and_steps_run(device):
    for op, h in (("token_logprobs", None), ("fused_linear_logprobs", 8)):
        for kept in bench_filtered_logprobs.KEPT_SETS:
            inp = bench_filtered_logprobs.make_inputs(op, 5, h, 40, torch.float32, device, kept)
            assert inp["cutoffs"].shape == (5, 2) and inp["targets"].shape == (5,)
            for variant in ("plain", "filtered"):
                bench_filtered_logprobs.step(op, variant, inp, "reference")

