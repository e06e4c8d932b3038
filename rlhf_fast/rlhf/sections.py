"""The sections of a run's configuration, one dataclass each: every field has a default and, under it,
the docstring that becomes its ``--help`` text (``config.field_help``). ``config.Config`` gathers them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


@dataclass
class RunConfig:
    out: str = "runs/rlhf"
    """run directory: resolved config, per-stage metrics.jsonl, checkpoints and plots, summary.json"""
    seed: int = 0
    """seed for data order, initialization and sampling (runs are deterministic on CPU)"""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """autocast dtype of forward passes (master weights stay float32)"""
    tokenizer: str = "byte"
    """'byte', 'tiktoken:<encoding>' or 'hf:<local tokenizer dir>'"""
    distributed: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """'auto' uses DDP when launched by torchrun with WORLD_SIZE > 1; 'fsdp' shards with FSDP2 fully_shard"""
    backend: Literal["auto", "triton", "cuda", "reference"] = "auto"
    """backend of the model's rlhf_fast ops (attention, fused logprobs); 'auto' picks the fused kernels on GPU"""
    progress: bool = True
    """show tqdm progress bars"""
    plots: bool = True
    """write PNG plots of each stage's metrics (matplotlib) into <out>/<stage>/plots"""
    threads: int = 1
    """torch CPU threads per process (0 = torch's default); small models run fastest on one"""
    report_to: str = ""
    """experiment trackers receiving every metric too: '' or comma-separated tensorboard, wandb (optional
    extras; wandb follows WANDB_MODE / WANDB_PROJECT); metrics.jsonl stays the source of truth"""


@dataclass
class ModelConfig:
    """The GPT's architecture when a stage starts from scratch (every GPTConfig field but vocab_size,
    which the tokenizer sets, and backend, which run.backend sets); ignored when `init` is set."""
    init: str = ""
    """Hugging Face folder (Llama, Qwen2, Mistral, GPT-2) SFT starts from when sft.init is ''; '' = from scratch"""
    n_layer: int = 2
    """transformer blocks"""
    n_head: int = 4
    """attention (query) heads"""
    n_kv_head: int = 0
    """key/value heads (grouped-query attention); 0 = n_head"""
    n_embd: int = 128
    """hidden size"""
    head_dim: int = 0
    """size of each attention head; 0 = n_embd // n_head"""
    n_inner: int = 0
    """MLP hidden width; 0 = 4 * n_embd"""
    block_size: int = 32
    """longest sequence (prompt + response) in tokens"""
    dropout: float = 0.0
    """embedding and residual dropout"""
    bias: bool = True
    """biases in the Linear layers and norms (GPT-2)"""
    qkv_bias: Literal["as_bias", "true", "false"] = "as_bias"
    """bias on the q, k, v projections ('as_bias' = follow bias; Qwen2: true with bias=false)"""
    score_bias: bool = True
    """bias on the reward/value head (the reward model folds its normalization into it)"""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """normalization layers"""
    norm_eps: float = 1e-5
    """epsilon of every norm"""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """MLP: tanh-GELU (GPT-2) or SwiGLU (Llama)"""
    pos_emb: Literal["learned", "rope"] = "learned"
    """positions: learned absolute (GPT-2) or rotary"""
    rope_theta: float = 10000.0
    """RoPE base frequency"""
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    """RoPE frequency scaling"""
    rope_factor: float = 1.0
    """RoPE scaling factor ('linear', 'llama3')"""
    rope_low_freq_factor: float = 1.0
    """'llama3' rope scaling: low-frequency factor"""
    rope_high_freq_factor: float = 4.0
    """'llama3' rope scaling: high-frequency factor"""
    rope_original_max_positions: int = 8192
    """'llama3' rope scaling: the pretraining context length"""
    tie_word_embeddings: bool = True
    """the LM head shares the token embedding's weight"""
    gradient_checkpointing: bool = False
    """recompute each block in backward to save activation memory"""
    family: str = ""
    """Hugging Face family export writes ('' = the one the switches match: gpt2, llama or qwen2)"""

    def gpt_config_kwargs(self) -> dict:
        """GPTConfig keyword arguments (all but vocab_size and backend) for a model built from scratch."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "init"}
        for name in ("n_kv_head", "head_dim", "n_inner"):
            kw[name] = kw[name] or None
        kw["qkv_bias"] = {"as_bias": None, "true": True, "false": False}[self.qkv_bias]
        kw["family"] = self.family or None
        return kw

    def take_architecture(self, gpt_config: dict) -> None:
        """Set every field but `init` from a GPTConfig dict (a checkpoint's or an HF folder's), the inverse
        of gpt_config_kwargs, so the section records the model a stage trains."""
        from ..model import GPTConfig
        c = GPTConfig(**gpt_config)  # fields an older checkpoint lacks: GPTConfig's defaults, as load_model
        for f in dataclasses.fields(self):
            if f.name != "init":
                setattr(self, f.name, getattr(c, f.name))
        self.head_dim, self.n_inner, self.family = c.head_dim or 0, c.n_inner or 0, c.family or ""
        self.qkv_bias = {None: "as_bias", True: "true", False: "false"}[c.qkv_bias]


@dataclass
class TaskConfig:
    min_digits: int = 3
    """shortest list to sort in the built-in task"""
    max_digits: int = 5
    """longest list to sort in the built-in task"""
    n_sft: int = 20000
    """SFT demonstrations to generate"""
    demo_error_rate: float = 0.4
    """fraction of SFT demonstrations that are wrong (two neighbouring digits swapped)"""
    n_pairs: int = 8000
    """preference pairs for reward-model training"""
    n_eval_pairs: int = 500
    """held-out preference pairs (clean labels)"""
    label_noise: float = 0.1
    """probability that a training pair's preference label is flipped"""
    n_prompts: int = 4000
    """PPO training prompts"""
    n_eval_prompts: int = 256
    """held-out prompts for the task score"""


@dataclass
class OptimConfig:
    """AdamW, its learning-rate schedule and the checkpoint cadence: the fields the SFT and reward-model
    stages share (the defaults are SFT's; RMConfig sets its own lr, warmup_steps and ckpt_every)."""
    steps: int = 300
    """optimizer steps"""
    lr: float = 3e-3
    """peak learning rate (AdamW), linear warmup then cosine decay to lr/10"""
    warmup_steps: int = 30
    """linear warmup steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """gradient norm clip (0 = off)"""
    ckpt_every: int = 200
    """steps between checkpoints (and at the end)"""


@dataclass
class SFTConfig(OptimConfig):
    data: str = ""
    """SFT data ({prompt, response}): JSONL, .parquet or hf:DIR (save_to_disk); '' = the built-in task's data"""
    init: str = ""
    """checkpoint to start from ('' = random initialization)"""
    batch_size: int = 64
    """sequences per step"""
    packing: Literal["auto", "packed", "padded"] = "auto"
    """'packed': one row, no padding (varlen attention); 'padded': right-padded rows; 'auto': packed on
    CUDA, padded on CPU (where the reference varlen attention loops over sequences)"""


@dataclass
class RMConfig(OptimConfig):
    # the reward model's own defaults of OptimConfig fields (their help text is OptimConfig's)
    lr: float = 1e-3
    warmup_steps: int = 20
    ckpt_every: int = 100
    data: str = ""
    """training pairs (JSONL, .parquet or hf:DIR) ({prompt, chosen, rejected}); '' = built-in task data"""
    eval_data: str = ""
    """held-out pairs JSONL; '' = built-in task data"""
    init: str = "sft"
    """'sft' = this run's SFT checkpoint, a checkpoint path, or '' for random initialization"""
    batch_size: int = 64
    """pairs per step"""
    norm_samples: int = 256
    """SFT-policy samples used to normalize the reward to mean 0, std 1 (0 = no normalization)"""


@dataclass
class RolloutConfig:
    """How rollouts are sampled and how often an RL stage evaluates and checkpoints: the fields the ppo and
    rl sections share."""
    max_new_tokens: int = 8
    """response length limit"""
    temperature: float = 1.0
    """sampling temperature (re-scoring divides logits by it too)"""
    top_k: int = 0
    """top-k filter for rollouts (0 = off)"""
    top_p: float = 1.0
    """top-p filter for rollouts (1 = off)"""
    min_p: float = 0.0
    """min-p filter for rollouts (0 = off): keeps tokens with probability >= min_p * the largest"""
    logprob_space: Literal["filtered", "full"] = "filtered"
    """the policy that trains when a filter is on (policy_space.py): 'filtered' = the policy that samples
    (tempered, renormalized over each position's kept set, fixed at its rollout value) for every logprob,
    entropy and KL; 'full' = the unfiltered tempered softmax everywhere (behaviour logprobs recomputed)"""
    eval_every: int = 5
    """iterations between task-score evaluations (and at the end)"""
    ckpt_every: int = 10
    """iterations between checkpoints (and at the end)"""


@dataclass
class PPOConfig(RolloutConfig):
    prompts: str = ""
    """training prompts (JSONL, .parquet or hf:DIR) ({prompt}); '' = built-in task data"""
    eval_prompts: str = ""
    """held-out prompts JSONL for the task score; '' = built-in task data"""
    policy_init: str = "sft"
    """'sft' = this run's SFT checkpoint, or a checkpoint path (also the frozen KL reference)"""
    reward_init: str = "rm"
    """'rm' = this run's reward-model checkpoint, or a path; also initializes the value model"""
    reward_fn: str = ""
    """optional 'module:function' taking (prompts, responses) lists of text and returning floats"""
    reward_mode: Literal["model", "fn", "sum"] = "model"
    """score = reward model, reward_fn, or their sum"""
    steps: int = 30
    """PPO iterations (rollout batch + update)"""
    rollout_batch_size: int = 64
    """prompts per iteration (global, over all ranks)"""
    gen_batch_size: int = 32
    """prompts generated together; keep it fixed to get the same samples on any number of ranks"""
    minibatch_size: int = 32
    """sequences per optimizer step (global)"""
    ppo_epochs: int = 2
    """passes over each rollout batch"""
    lr: float = 1e-4
    """policy learning rate (AdamW)"""
    value_lr: float = 3e-4
    """value model learning rate (AdamW)"""
    grad_clip: float = 1.0
    """gradient norm clip of each model (0 = off)"""
    gamma: float = 1.0
    """GAE discount"""
    lam: float = 0.95
    """GAE lambda"""
    clip_range: float = 0.2
    """policy ratio clip"""
    value_clip_range: float = 0.2
    """value prediction clip around the rollout values"""
    kl_kind: Literal["k1", "k2", "k3", "full"] = "k1"
    """per-token KL estimator of the penalty against the SFT reference (k1, k2, k3), or 'full' = the exact KL
    over the vocabulary (or the kept set) at every position (fused, no logits in memory)"""
    kl_coef: float = 0.2
    """KL penalty coefficient (initial value when adaptive_kl)"""
    adaptive_kl: bool = False
    """adapt kl_coef towards target_kl (Ziegler et al.)"""
    target_kl: float = 1.0
    """target KL per sequence for adaptive_kl"""
    kl_horizon: int = 10000
    """adaptive KL horizon in samples"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of a response that never emits EOS"""
    whiten_advantages: bool = True
    """normalize advantages to mean 0, std 1 over the rollout batch"""


@dataclass
class RLConfig(RolloutConfig):
    """The `rl` stage: PPO (the ppo section) or a critic-free algorithm with G samples per prompt."""
    algo: Literal["ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp"] = "ppo"
    """'ppo' runs the ppo stage (ppo section); the others are critic-free (no value model)"""
    group_size: int = 8
    """G: samples per prompt, whose rewards give each other's baseline"""
    prompts: str = ""
    """training prompts JSONL ({prompt, ...: every other field goes to the reward functions}); '' = built-in task"""
    eval_prompts: str = ""
    """held-out prompts JSONL, scored by the reward functions; '' = built-in task data"""
    policy_init: str = "sft"
    """'sft' = this run's SFT checkpoint, or a checkpoint path (also the frozen KL reference)"""
    reward_fn: str = ""
    """'module:fn[,module:fn...]' called as fn(prompts, responses, **fields) -> float or None per response;
    '' = the built-in task's answer check, or the reward model of reward_init for other prompts"""
    reward_weights: str = ""
    """comma-separated weight of each reward_fn ('' = 1 each)"""
    reward_init: str = ""
    """reward-model checkpoint ('rm' = this run's) scoring responses when reward_fn is '' on own prompts"""
    steps: int = 40
    """iterations (rollout batch + update)"""
    rollout_batch_size: int = 16
    """prompts per iteration (global, over all ranks); each gives group_size samples"""
    gen_batch_size: int = 8
    """prompts generated together; keep it fixed to get the same samples on any number of ranks"""
    minibatch_size: int = 128
    """sequences (samples) per optimizer step (global)"""
    epochs: int = 1
    """passes over each rollout batch (1 = on-policy)"""
    lr: float = 1e-4
    """policy learning rate (AdamW)"""
    grad_clip: float = 1.0
    """gradient norm clip (0 = off)"""
    clip_range: float = 0.2
    """policy ratio clip (low side, and high side unless clip_range_high)"""
    clip_range_high: float = 0.0
    """high-side ratio clip (DAPO clip-higher); 0 = clip_range"""
    dual_clip: float = 0.0
    """dual-clip bound c > 1 on negative-advantage tokens (Ye et al. 2020); 0 = off"""
    kl_coef: float = 0.04
    """beta of the KL to the reference; 0 loads no reference model"""
    kl_in: Literal["auto", "reward", "loss"] = "auto"
    """'reward': -beta * KL shapes the reward (PPO style); 'loss': beta * KL per token in the loss (GRPO:
    k3, or the exact KL with kl_kind='full'); 'auto' = the algorithm's own"""
    kl_kind: Literal["k1", "k2", "k3", "full"] = "k1"
    """KL estimator when kl_in='reward'; 'full' = the exact KL over the vocabulary (or the kept set) at every
    position, in the reward or (differentiable) in the loss"""
    scale: Literal["auto", "group", "batch", "none"] = "auto"
    """advantage scale: group std (GRPO), batch std, or none (Dr. GRPO, RLOO); 'auto' = the algorithm's
    (reinforce_pp always whitens its per-token returns over the batch)"""
    loss_agg: Literal["auto", "seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] = "auto"
    """how token losses are averaged (GRPO, DAPO, Dr. GRPO); 'auto' = the algorithm's"""
    missing_eos_penalty: float = 0.0
    """subtracted from the reward of a response that never emits EOS"""


@dataclass
class LoRASection:
    """Low-rank adapters on the model a stage trains (sft, rm, ppo, rl); base weights frozen. The reference
    policy is the policy with its adapters switched off, and PPO's value model is adapters (and a value
    head) on the reward model's backbone: no second copy of either's weights."""
    r: int = 0
    """rank of every adapter; 0 = LoRA off (full fine-tuning)"""
    alpha: float = 16.0
    """adapters are scaled by alpha / r"""
    dropout: float = 0.0
    """dropout on each adapter's input"""
    targets: str = "all"
    """'all' or comma-separated projections: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"""


@dataclass
class TrainConfig:
    """Memory switches every stage takes: accumulation, recomputation, the dtype of frozen models, the
    scoring batch, the memory plan printed (and checked) before any model is loaded."""
    grad_accum: int = 1
    """micro-batches per optimizer step: each rank's share of a batch (minibatch) is split in this many
    forward/backward passes whose gradients add up to the whole batch's; must divide that share"""
    grad_checkpointing: bool = False
    """recompute each block in backward (less activation memory, about a third more compute) in every
    model a stage trains, whatever its init"""
    frozen_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the weights nobody trains: the reference and reward models and, with LoRA, the policy's
    frozen base (adapters stay float32)"""
    score_batch_size: int = 0
    """rows per forward when a rollout is scored by the frozen models and the value model (0 = the
    generation chunk, ppo/rl.gen_batch_size)"""
    memory_limit_gib: float = 0.0
    """memory the plan must fit in (0 = the device's free memory; on CPU the available RAM)"""
    memory_check: bool = True
    """stop before loading anything when the memory plan does not fit (false: print it and go on)"""
    fused_loss: bool = True
    """RL updates without sampling filters take the policy loss's gradient inside the lm_head pass
    (fused_linear_token_loss: one lm_head matmul fewer, over the response positions only); false: the
    logprob op, then the loss and its backward"""


@dataclass
class DataConfig:
    """How the stages read your JSONL data files (the built-in task's files keep the default keys)."""
    prompt_key: str = "prompt"
    """key of the prompt in every data file"""
    response_key: str = "response"
    """key of the SFT response"""
    chosen_key: str = "chosen"
    """key of the preferred answer of a reward-model pair"""
    rejected_key: str = "rejected"
    """key of the other answer of a reward-model pair"""
    chat_template: bool = False
    """render each plain-text prompt as one user message through the hf: tokenizer's chat template"""
