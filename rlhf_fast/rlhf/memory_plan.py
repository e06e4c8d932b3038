"""The memory plan a stage prints before it loads anything: per model (policy, reference, value, reward)
its weights, gradients, AdamW state and estimated peak activations in GiB, and the total against the
memory the device has free (on CPU: the available RAM). A plan that does not fit stops the stage, naming
the switches (LoRA, train.grad_checkpointing, train.grad_accum, train.frozen_dtype) that would make it fit.

Parameter counts are exact: each model is built on the meta device (no memory) from the GPTConfig its
init names, LoRA adapters included. Activations are an estimate, per block and token, of what autograd
keeps for backward in this GPT (elements; times 4 bytes, 2 under bf16 autocast):

    2 norms (input, output)                       4 C
    q, k, v as attention reads them, its output   4 Hq D
    the attention's log-sum-exp (fp32, per head)  Hq
    MLP: GELU input and output                     2 F      (SwiGLU: gate|up, silu(gate), product: 4 F)

with C = n_embd, Hq D = heads x head size, F = MLP width, T = the sequence length. No attention keeps a
(T, T) matrix for backward (the kernels and the reference both recompute); the reference attention (CPU,
backend="reference") builds one layer's fp32 scores, probabilities and their gradients, 4 Hq T^2 per
sequence, while that layer runs: a transient added once (dense_attention). Gradient checkpointing
keeps each block's input (C) and recomputes one block at a time. The LM head never holds the logits (the
fused logprob op works in chunks of CHUNK_ELEMENTS). A stage's total adds every model's weights, gradients
and optimizer state, the largest model's activations (models train one after another) and, for RL
stages, the generation KV cache. benchmarks/bench_memory.py compares this with measured peaks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..reference._chunks import CHUNK_ELEMENTS

GIB = 1024 ** 3


@dataclass
class ModelMemory:
    name: str  # policy, reference, value, reward
    params: int  # every parameter (a LoRA model: base + adapters)
    trainable: int  # parameters AdamW updates
    weight_bytes: int
    activation_bytes: int  # peak of one training forward + backward (frozen models: one scoring forward)
    shards: int = 1  # FSDP: ranks its gradients and optimizer state are sharded over (weights are gathered
    # whole for generation, so they are counted whole)
    grad_shards: int | None = None  # where gradients are not sharded like the optimizer state: FSDP with
    # accumulation holds whole (unsharded) gradients until the last micro-batch (microbatch.grad_sync)

    @property
    def grad_bytes(self) -> int:
        return 4 * self.trainable // (self.shards if self.grad_shards is None else self.grad_shards)

    @property
    def optimizer_bytes(self) -> int:
        return 8 * self.trainable // self.shards  # AdamW: two fp32 moments


@dataclass
class MemoryPlan:
    stage: str
    models: list[ModelMemory]
    extra: dict[str, int] = field(default_factory=dict)  # e.g. the generation KV cache

    @property
    def total_bytes(self) -> int:
        static = sum(m.weight_bytes + m.grad_bytes + m.optimizer_bytes for m in self.models)
        return static + max((m.activation_bytes for m in self.models), default=0) + sum(self.extra.values())

    def table(self, available: int | None = None) -> str:
        """The plan as a fixed-width table (GiB), with the total against `available` bytes if given."""
        g = lambda b: f"{b / GIB:9.3f}"  # noqa: E731
        rows = [f"memory plan ({self.stage})   params(M) trainable(M)   weights     grads optimizer activations"]
        for m in self.models:
            rows.append(f"  {m.name:<22}{m.params / 1e6:10.2f}{m.trainable / 1e6:13.2f}{g(m.weight_bytes)} "
                        f"{g(m.grad_bytes)} {g(m.optimizer_bytes)}   {g(m.activation_bytes)}")
        for name, b in self.extra.items():
            rows.append(f"  {name:<22}{'':23}{g(b)}")
        line = f"  total (peak estimate){'':23}{g(self.total_bytes)} GiB"
        if available is not None:
            line += f" of {available / GIB:.2f} GiB free"
        return "\n".join(rows + [line])


def count_parameters(config: dict, head: str = "lm", lora=None) -> tuple[int, int]:
    """(all parameters, trainable parameters) of GPT(GPTConfig(**config), head) with `lora`
    (r, alpha, targets) adapters (base frozen), counted on the meta device."""
    from ..model import GPT, GPTConfig, apply_lora
    with torch.device("meta"):
        model = GPT(GPTConfig(**{**config, "backend": "reference"}), head=head)
        if lora is not None:
            apply_lora(model, lora[0], lora[1], 0.0, lora[2])
    seen = {id(p): p for p in model.parameters()}.values()  # tied embeddings count once
    return sum(p.numel() for p in seen), sum(p.numel() for p in seen if p.requires_grad)


def _dims(config: dict) -> tuple[int, int, int, int]:
    from ..model import GPTConfig
    c = GPTConfig(**{**config, "backend": "reference"})
    return c.n_embd, c.n_head * c.head_size, c.mlp_hidden, c.n_head


def activation_bytes(config: dict, rows: int, seq_len: int, *, checkpointing: bool = False,
                     dense_attention: bool = True, elem_bytes: int = 4, training: bool = True,
                     lm_head: bool = True) -> int:
    """Estimated peak bytes autograd holds for one forward + backward of `rows` sequences of `seq_len`
    tokens (training=False: one forward under no_grad, which holds about one block's tensors), plus, with
    lm_head, the fused logprob op's transient logits chunk (value and reward heads have none)."""
    C, Q, F, H = _dims(config)
    swiglu = config.get("mlp", "gelu") == "swiglu"
    per_block = 4 * C + 4 * Q + H + (4 if swiglu else 2) * F  # per token
    tokens = rows * seq_len
    # the reference attention's (T, T) fp32 blocks of one layer (scores, probabilities; their gradients in
    # backward): transient, one layer at a time
    dense = rows * H * seq_len * seq_len * 4 * (4 if training else 2) if dense_attention else 0
    vocab = config["vocab_size"]
    # the LM head's logits chunk (fp32; with its softmax and gradient in backward); value/reward heads: none
    head = min(tokens * vocab, max(vocab, CHUNK_ELEMENTS)) * 4 * (3 if training else 1) if lm_head else 0
    if not training:
        return tokens * per_block * elem_bytes + head + dense
    layers = config["n_layer"]
    if checkpointing:
        held = layers * C + per_block  # block inputs, and one block recomputed in backward
    else:
        held = layers * per_block
    return (tokens * (held + 2 * C)) * elem_bytes + head + dense  # + embeddings and the final norm


def kv_cache_bytes(config: dict, rows: int, seq_len: int, elem_bytes: int = 4) -> int:
    from ..model import GPTConfig
    c = GPTConfig(**{**config, "backend": "reference"})
    return 2 * c.n_layer * rows * seq_len * c.n_kv_head * c.head_size * elem_bytes


def available_bytes(device: torch.device | str, limit_gib: float = 0.0) -> int:
    """`limit_gib` when set, else the device's free memory (CUDA: mem_get_info; CPU: MemAvailable)."""
    if limit_gib > 0:
        return int(limit_gib * GIB)
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def stage_plan(cfg, stage: str, policy: dict, reward: dict | None = None, *, world: int = 1,
               device_type: str = "cpu", seq_len: int | None = None, sharded: bool = False) -> MemoryPlan:
    """The plan of `stage` ('sft', 'rm', 'ppo', 'rl') under `cfg` (a Config) on `world` ranks of
    `device_type`. policy: GPTConfig dict of the model the stage trains (rm: the reward model); reward:
    that of the reward model (ppo, and rl when it scores with one). seq_len: tokens per sequence
    (default model.block_size, the longest a stage allows); sharded: FSDP (gradients and AdamW state of
    the trained models split over the ranks; gradients whole with train.grad_accum > 1)."""
    t, T = cfg.train, seq_len or cfg.model.block_size
    act_bytes = 2 if cfg.run.dtype == "bfloat16" else 4
    frozen_bytes = 2 if t.frozen_dtype == "bfloat16" else 4
    dense = device_type == "cpu" or cfg.run.backend == "reference"
    lora = (cfg.lora.r, cfg.lora.alpha, cfg.lora.targets) if cfg.lora.r > 0 else None

    def model(name: str, config: dict, head: str, rows: int, trained: bool, adapters=None) -> ModelMemory:
        params, trainable = count_parameters(config, head, adapters)
        trainable = trainable if trained else 0
        base_bytes = 4 if trained and adapters is None else frozen_bytes
        return ModelMemory(name, params, trainable, 4 * trainable + base_bytes * (params - trainable),
                           activation_bytes(config, rows, T, checkpointing=t.grad_checkpointing,
                                            dense_attention=dense, elem_bytes=act_bytes, training=trained,
                                            lm_head=head == "lm"), world if sharded else 1,
                            grad_shards=world if sharded and t.grad_accum == 1 else 1)

    def share(batch: int) -> int:  # rows of one micro-batch on one rank
        if batch % (world * t.grad_accum):
            raise ValueError(f"train.grad_accum={t.grad_accum} does not divide {batch} rows over {world} rank(s)")
        return batch // world // t.grad_accum

    if stage in ("sft", "rm"):
        c = cfg.sft if stage == "sft" else cfg.rm
        rows = share(c.batch_size) * (2 if stage == "rm" else 1)  # rm: chosen + rejected
        return MemoryPlan(stage, [model("policy" if stage == "sft" else "reward", policy,
                                        "lm" if stage == "sft" else "reward", rows, True, lora)])
    c = cfg.ppo if stage == "ppo" or cfg.rl.algo == "ppo" else cfg.rl
    group = 1 if c is cfg.ppo else cfg.rl.group_size
    train_rows = share(c.minibatch_size)
    score_rows = t.score_batch_size or c.gen_batch_size * group
    models = [model("policy", policy, "lm", train_rows, True, lora)]
    if c is cfg.ppo or cfg.rl.kl_coef > 0:
        if lora is not None:  # the policy with its adapters off: nothing more in memory
            models.append(ModelMemory("reference (=policy)", 0, 0, 0, 0))
        else:
            models.append(model("reference", policy, "lm", score_rows, False))
    if c is cfg.ppo and lora is not None:  # adapters and a head on the reward model's backbone
        shared = model("value (reward's base)", reward, "value", train_rows, True, lora)
        models.append(ModelMemory(shared.name, shared.trainable, shared.trainable, 4 * shared.trainable,
                                  shared.activation_bytes, shared.shards))
    elif c is cfg.ppo:
        models.append(model("value", reward, "value", train_rows, True))
    if reward is not None:
        models.append(model("reward", reward, "reward", score_rows, False))
    cache = kv_cache_bytes(policy, c.gen_batch_size * group, T, act_bytes)
    return MemoryPlan(stage, models, {"generation KV cache": cache})


def switches_that_fit(cfg, plan_of, available: int) -> list[str]:
    """The command-line switches (alone, else all together) under which `plan_of(config)` fits in
    `available` bytes; [] when none does."""
    import copy
    options = []
    if cfg.lora.r == 0:
        options.append(("--lora.r=16", lambda c: setattr(c.lora, "r", 16)))
    if not cfg.train.grad_checkpointing:
        options.append(("--train.grad_checkpointing=true", lambda c: setattr(c.train, "grad_checkpointing", True)))
    if cfg.train.frozen_dtype != "bfloat16":
        options.append(("--train.frozen_dtype=bfloat16", lambda c: setattr(c.train, "frozen_dtype", "bfloat16")))
    for n in (2, 4, 8, 16, 32, 64):
        options.append((f"--train.grad_accum={cfg.train.grad_accum * n}",
                        lambda c, n=n: setattr(c.train, "grad_accum", c.train.grad_accum * n)))
    fits = []
    for label, change in options:
        trial = copy.deepcopy(cfg)
        change(trial)
        if label.startswith("--train.grad_accum") and any("grad_accum" in f for f in fits):
            continue
        try:
            if plan_of(trial).total_bytes <= available:
                fits.append(label)
        except ValueError:  # an accumulation that does not divide the batch
            continue
    if fits:
        return fits
    trial = copy.deepcopy(cfg)
    for _, change in options[:3]:
        change(trial)
    together = [label for label, _ in options[:3]]
    for label, change in options[3:]:
        step = copy.deepcopy(trial)
        change(step)
        try:
            if plan_of(step).total_bytes <= available:
                return [" ".join(together + [label])]
        except ValueError:
            break
    return []


def check_plan(cfg, plan: MemoryPlan, plan_of, available: int, where: str) -> None:
    """ValueError when `plan` does not fit in `available` bytes (unless train.memory_check is off), naming
    what would fit. plan_of(config) -> the plan under another config (to try the switches)."""
    if plan.total_bytes <= available or not cfg.train.memory_check:
        return
    fits = switches_that_fit(cfg, plan_of, available)
    hint = (f"it would fit with {' or '.join(fits)}" if fits else
            "no single switch makes it fit: use a smaller model, batch or sequence length")
    raise ValueError(f"memory plan of the {plan.stage} stage: about {plan.total_bytes / GIB:.2f} GiB needed, "
                     f"{available / GIB:.2f} GiB free on {where}; {hint} "
                     "(or --train.memory_check=false to try anyway)\n" + plan.table(available))


def preflight_plan(cfg, stage: str, inits: list[dict | None], vocab_size: int, world: int,
                   device: str, mode: str = "none") -> str:
    """The stage's plan as a table against the memory free on `device`, checked (check_plan); '' when an
    init's architecture is not known yet (a checkpoint an earlier stage of the same command will write).
    inits: the GPTConfig dicts of the stage's inits in run_dir's order (the trained model's first)."""
    if any(c is None for c in inits):
        return ""
    from ..model import GPTConfig
    scratch = GPTConfig(**cfg.model.gpt_config_kwargs(), vocab_size=vocab_size).to_dict()
    policy, reward = (inits[0] if inits else scratch), (inits[1] if len(inits) > 1 else None)
    device_type = torch.device(device).type

    def plan_of(c):
        return stage_plan(c, stage, policy, reward, world=world, device_type=device_type, sharded=mode == "fsdp")
    plan, available = plan_of(cfg), available_bytes(device, cfg.train.memory_limit_gib)
    check_plan(cfg, plan, plan_of, available, device)
    return plan.table(available)
