"""trl's PPOTrainer (trl.experimental.ppo, trl 1.12) as a peer of bench_ppo_step: one PPO update's phases.

trl runs its own loop, so its phases are read off the loop with markers (module functions wrapped, not
changed): generation = trl's `batch_generation`; scoring = from its end to the first forward with
gradients (reference logprobs, value and reward models, rewards, GAE); training = from there to the end
of the update (its PPO epochs and minibatches, then its statistics). The models are transformers'
GPT-2 classes built from the config bench_ppo_step gives rlhf_fast; the last id is the only stop id,
so rows rarely stop early, as on our side. Each update's phases are measured; the caller keeps the
best of the updates after the first (warm-up).
"""
from __future__ import annotations

import copy
import tempfile
import time


def available() -> str | None:
    """None when trl 1.12's PPOTrainer imports here, else why not."""
    try:
        import datasets  # noqa: F401
        import trl
        from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: no peer here
        return f"trl's PPOTrainer unavailable ({type(exc).__name__}: {exc})"
    if not trl.__version__.startswith("1.12"):
        return f"trl {trl.__version__} installed; the peer is pinned to trl 1.12"
    return None


def _tokenizer(vocab: int):
    """A word-level tokenizer over ids 0..V-1: id 0 pads, id V-1 is EOS."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token=f"t{vocab - 1}",
                                   unk_token="t0")


def update_phases(model_kwargs: dict, B: int, P: int, T: int, epochs: int, updates: int = 3,
                  seed: int = 0, clock=time.perf_counter) -> list[dict]:
    """Seconds of each phase of `updates` PPO updates of trl's trainer on B prompts of P random ids plus
    T new tokens, `epochs` PPO epochs over one minibatch, GPT-2 models of model_kwargs (n_layer, n_head,
    n_embd, vocab_size), read off `clock`."""
    import datasets
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trainer_module

    V = model_kwargs["vocab_size"]
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=model_kwargs["n_layer"], n_head=model_kwargs["n_head"],
                        n_embd=model_kwargs["n_embd"], vocab_size=V, n_positions=P + T, bos_token_id=V - 1,
                        eos_token_id=V - 1, pad_token_id=0, num_labels=1)
    policy = GPT2LMHeadModel(config)
    ref = copy.deepcopy(policy)
    value, reward = GPT2ForSequenceClassification(config), GPT2ForSequenceClassification(config)
    prompts = torch.randint(1, V - 1, (B * updates, P), generator=torch.Generator().manual_seed(seed))
    data = datasets.Dataset.from_dict({"input_ids": prompts.tolist()})
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(output_dir=out, per_device_train_batch_size=B, gradient_accumulation_steps=1,
                         num_mini_batches=1, total_episodes=B * updates, num_ppo_epochs=epochs,
                         response_length=T, temperature=1.0, stop_token="eos", missing_eos_penalty=None,
                         local_rollout_forward_batch_size=B, num_sample_generations=0, report_to=[],
                         save_strategy="no", logging_steps=10 ** 6, use_cpu=True, seed=seed,
                         learning_rate=1e-5, dataloader_num_workers=0)
        trainer = PPOTrainer(args=args, processing_class=_tokenizer(V), model=policy, ref_model=ref,
                             reward_model=reward, train_dataset=data, value_model=value)
        marks: list[tuple[str, float]] = []
        real_generation, real_forward = trainer_module.batch_generation, trainer_module.forward

        def batch_generation(*a, **k):
            marks.append(("gen_start", clock()))
            out_ = real_generation(*a, **k)
            marks.append(("gen_end", clock()))
            return out_

        def forward(*a, **k):
            if torch.is_grad_enabled() and marks and marks[-1][0] == "gen_end":
                marks.append(("train_start", clock()))
            return real_forward(*a, **k)

        trainer_module.batch_generation, trainer_module.forward = batch_generation, forward
        try:
            trainer.train()
        finally:
            trainer_module.batch_generation, trainer_module.forward = real_generation, real_forward
        marks.append(("gen_start", clock()))  # the end of the last update
    phases = []
    starts = [i for i, (name, _) in enumerate(marks) if name == "gen_start"]
    for a, b in zip(starts, starts[1:]):
        t = dict(marks[a:b])
        phases.append({"generation": t["gen_end"] - t["gen_start"], "scoring": t["train_start"] - t["gen_end"],
                       "training": marks[b][1] - t["train_start"]})
    return phases
