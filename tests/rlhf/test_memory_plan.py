"""The memory plan: exact parameter counts (full and LoRA) against real models, the activation estimate
against the bytes autograd really keeps, the stage rows (a LoRA reference costs nothing, bf16 frozen
weights half), and a stage that cannot fit stopping before it writes or loads anything, naming a switch."""
import pytest
import torch

from rlhf_fast.model import GPT, GPTConfig, apply_lora
from rlhf_fast.rlhf import pipeline
from rlhf_fast.rlhf.config import build_config
from rlhf_fast.rlhf.memory_plan import GIB, activation_bytes, count_parameters, stage_plan, switches_that_fit

GPT2 = dict(vocab_size=300, n_layer=2, n_head=4, n_embd=64, block_size=256, backend="reference")
LLAMA = dict(GPT2, norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, n_kv_head=2,
             tie_word_embeddings=False, n_inner=172)


@pytest.mark.parametrize("shape", [GPT2, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize("head", ["lm", "value"])
def test_parameter_counts_are_the_models(shape, head):
    model = GPT(GPTConfig(**shape), head=head)
    unique = {id(p): p for p in model.parameters()}.values()
    assert count_parameters(shape, head) == (sum(p.numel() for p in unique),) * 2
    apply_lora(model, 3, 6.0, 0.0, "all")
    unique = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    assert count_parameters(shape, head, (3, 6.0, "all")) == (sum(p.numel() for p in unique), trainable)
    assert 0 < trainable < sum(p.numel() for p in unique) / 4


def _saved_bytes(model, idx, mask) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward, weights aside."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            storages[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx, attention_mask=mask)
    return sum(storages.values())


@pytest.mark.parametrize("shape", [GPT2, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize("rows,seq", [(1, 17), (3, 64), (2, 200)])
def test_activation_estimate_is_within_a_quarter_of_what_autograd_keeps(shape, rows, seq):
    model = GPT(GPTConfig(**shape)).train()
    idx = torch.randint(0, shape["vocab_size"], (rows, seq))
    measured = _saved_bytes(model, idx, torch.ones_like(idx))
    # the logits chunk and the reference attention's (T, T) blocks are transient, not saved
    estimate = activation_bytes(shape, rows, seq, lm_head=False, dense_attention=False)
    assert 0.75 * measured <= estimate <= 1.25 * measured, (estimate, measured)
    chunk = activation_bytes(shape, rows, seq, dense_attention=False) - estimate
    assert chunk == 3 * 4 * rows * seq * shape["vocab_size"]  # fp32 logits, softmax, gradient: one chunk here
    assert activation_bytes(shape, rows, seq, checkpointing=True, lm_head=False, dense_attention=False) < estimate
    dense = activation_bytes(shape, rows, seq, lm_head=False) - estimate  # one layer's scores, probs, grads
    assert dense == 4 * 4 * rows * shape["n_head"] * seq * seq


def _cfg(**extra):
    return build_config(None, {"ppo.rollout_batch_size": 8, "ppo.minibatch_size": 8, "ppo.gen_batch_size": 4,
                               "model.block_size": 64, **extra})


def test_ppo_plan_rows_follow_the_switches():
    full = stage_plan(_cfg(), "ppo", LLAMA, GPT2)
    assert [m.name for m in full.models] == ["policy", "reference", "value", "reward"]
    policy, ref, value, reward = full.models
    n = count_parameters(LLAMA)[0]
    assert policy.weight_bytes == ref.weight_bytes == 4 * n and policy.optimizer_bytes == 8 * n
    assert ref.grad_bytes == reward.grad_bytes == 0 and value.trainable == count_parameters(GPT2, "value")[0]
    static = sum(m.weight_bytes + m.grad_bytes + m.optimizer_bytes for m in full.models)
    assert full.total_bytes == static + policy.activation_bytes + full.extra["generation KV cache"]

    lora = stage_plan(_cfg(**{"lora.r": 4, "train.frozen_dtype": "bfloat16"}), "ppo", LLAMA, GPT2)
    policy, ref, value, reward = lora.models
    assert ref.weight_bytes == 0  # the policy with its adapters off
    value_trainable = count_parameters(GPT2, "value", (4, 16.0, "all"))[1]  # adapters and head on the reward's base
    assert value.trainable == value_trainable and value.weight_bytes == 4 * value_trainable
    adapters = count_parameters(LLAMA, "lm", (4, 16.0, "all"))[1]
    assert policy.trainable == adapters and policy.weight_bytes == 4 * adapters + 2 * n
    assert reward.weight_bytes == 2 * count_parameters(GPT2, "reward")[0]

    fsdp = stage_plan(_cfg(), "ppo", LLAMA, GPT2, world=2, sharded=True).models[0]
    assert (fsdp.weight_bytes, fsdp.grad_bytes, fsdp.optimizer_bytes) == (4 * n, 2 * n, 4 * n)  # over 2 ranks
    fsdp_accum = stage_plan(_cfg(**{"train.grad_accum": 2}), "ppo", LLAMA, GPT2, world=2, sharded=True).models[0]
    assert (fsdp_accum.grad_bytes, fsdp_accum.optimizer_bytes) == (4 * n, 4 * n)  # whole until the last micro-batch
    accum = stage_plan(_cfg(**{"train.grad_accum": 4}), "ppo", LLAMA, GPT2)
    assert accum.models[0].activation_bytes == pytest.approx(full.models[0].activation_bytes / 4, rel=1e-9)
    with pytest.raises(ValueError, match="grad_accum=3"):
        stage_plan(_cfg(**{"train.grad_accum": 3}), "ppo", LLAMA, GPT2)


def test_switches_that_fit_name_what_fits():
    cfg = _cfg()

    def plan_of(c):
        return stage_plan(c, "ppo", LLAMA, GPT2)
    full = plan_of(cfg).total_bytes
    lora_total = plan_of(_cfg(**{"lora.r": 16})).total_bytes
    assert "--lora.r=16" in switches_that_fit(cfg, plan_of, (full + lora_total) // 2)
    assert switches_that_fit(cfg, plan_of, 1000) == []


def test_a_stage_that_cannot_fit_stops_before_writing_naming_a_switch(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = build_config(None, {"run.out": str(out), "run.progress": "false", "run.plots": "false",
                              "model.n_layer": 4, "model.n_embd": 256, "model.n_head": 4, "model.block_size": 256,
                              "sft.batch_size": 64, "train.memory_limit_gib": 0.2})
    with pytest.raises(ValueError, match=r"memory plan of the sft stage: about .* GiB needed, 0.20 GiB free on "
                                         r"cpu; it would fit with .*--train\.grad"):
        pipeline.run_sft(cfg)
    assert not out.exists()
    small = build_config(None, {"run.out": str(out), "run.progress": "false", "run.plots": "false",
                                "model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2, "model.block_size": 20,
                                "task.n_sft": 16, "task.n_eval_prompts": 4, "sft.steps": 1, "sft.batch_size": 8,
                                "train.memory_limit_gib": 0.2})
    pipeline.run_sft(small)
    printed = capsys.readouterr().out
    assert "memory plan (sft)" in printed and "policy" in printed and f"{0.2:.2f} GiB free" in printed
    assert GIB == 1 << 30
