"""What every stage shares: device and process group, model build/load, wrapping (DDP / FSDP2),
checkpoints and resuming, the learning-rate schedule, the NaN guard, the metrics log and progress bar."""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint
from .config import Config
from .run_io import MetricsLogger, get_rng_state, set_rng_state


class NonFiniteError(RuntimeError):
    """A loss or reward became NaN/inf; the step was not applied and the last checkpoint is kept."""


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    mode: str = "none"  # "none" | "ddp" | "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `t` (same shape on all ranks) along dim 0, in rank order."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def check_runtime(cfg: Config) -> tuple[str, str, int]:
    """(device name, distributed mode, world size) for `cfg` in this process, or ValueError naming the
    run.* field that cannot work here (device, backend, distributed launch). Changes nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mode = cfg.run.distributed
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode != "none" and world == 1 and not dist.is_initialized():
        raise ValueError(f"run.distributed={mode!r} needs the processes torchrun starts (WORLD_SIZE is unset): "
                         f"torchrun --nproc_per_node=N -m rlhf_fast ... (or --run.distributed=auto for one process)")
    if world > 1 and mode == "none":
        raise ValueError("run.distributed='none' but the job was launched with WORLD_SIZE > 1")
    name = cfg.run.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"run.device={cfg.run.device!r} but torch.cuda.is_available() is False")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise ValueError(f"run.device={cfg.run.device!r} but there are {torch.cuda.device_count()} CUDA devices")
    if cfg.run.backend == "triton":
        from .._backend import triton_reason
        reason = triton_reason(torch.device(name.split(":")[0]))
        if reason is not None:
            raise ValueError(f"run.backend='triton' cannot run on run.device={name!r}: {reason}")
    return name, mode, world


def setup_runtime(cfg: Config) -> Runtime:
    """Pick the device, and join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    name, mode, world = check_runtime(cfg)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if name.startswith("cuda") else "gloo")
        rank = dist.get_rank()
        if name == "cuda":
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    else:
        rank = 0
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    return Runtime(device=device, rank=rank, world=world, mode=mode)


def build_model(cfg: Config, vocab_size: int, head: str = "lm"):
    from ..model import GPT, GPTConfig
    m = cfg.model
    gcfg = GPTConfig(**m.gpt_config_kwargs(), vocab_size=vocab_size, backend=cfg.run.backend)
    return GPT(gcfg, head=head)


def model_state(model) -> dict:
    """What a checkpoint stores for one model: config, head and full (unsharded) weights, and for a LoRA
    model its adapters' settings ("lora"; the weights then hold the frozen base and the adapters).
    With FSDP every rank must call it (gathering the shards is a collective)."""
    state = {"config": unwrap(model).config.to_dict(), "head": unwrap(model).head, "weights": full_state_dict(model)}
    lora = getattr(unwrap(model), "lora_config", None)
    if lora is not None:
        state["lora"] = {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets)}
    return state


def optimizer_state(model, opt) -> dict:
    """The optimizer state to checkpoint: unsharded, on CPU, keyed by parameter name, so it is the same
    whether `model` is sharded by FSDP, replicated by DDP or in one process, and resumes under any of them.
    Every rank must call it (gathering FSDP shards is a collective); the main rank gets the state, the
    others an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(unwrap(model), opt,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, opt, saved: dict) -> None:
    """Load `saved` (from ``optimizer_state``, or torch's own ``opt.state_dict()``) into `opt`, sharding
    it like `model`'s parameters. Every rank must call it with the full state (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(unwrap(model), opt, optim_state_dict=_keyed_by_name(saved, model),
                             options=StateDictOptions(full_state_dict=True))


def _keyed_by_name(saved: dict, model) -> dict:
    """`saved` with parameters named. Checkpoints of DDP and one-process runs written before names were
    used hold ``opt.state_dict()``, keyed by position in ``make_optimizer``'s order: named_parameters'."""
    if not all(isinstance(key, int) for group in saved["param_groups"] for key in group["params"]):
        return saved
    names = [name for name, _ in unwrap(model).named_parameters()]
    return {"state": {names[key]: value for key, value in saved["state"].items()},
            "param_groups": [{**group, "params": [names[key] for key in group["params"]]}
                             for group in saved["param_groups"]]}


def load_model(state: dict, device: torch.device, head: str | None = None, *, merge: bool = False):
    """Rebuild a model from `model_state(...)`; with `head` different from the saved one, the backbone
    is kept and the new head freshly initialized (e.g. an SFT policy -> a reward model).

    A LoRA model comes back with its adapters (to resume its stage); with merge=True, or a new head,
    they are folded into the weights and every parameter is trainable again (a later stage starts from
    the adapted model as plain weights)."""
    from ..model import GPT, GPTConfig, apply_lora, merge_lora
    model = GPT(GPTConfig(**state["config"]), head=state["head"])
    lora = state.get("lora")
    if lora:
        apply_lora(model, lora["r"], lora["alpha"], lora["dropout"], list(lora["targets"]))
    model.load_state_dict(state["weights"])
    if lora and (merge or (head is not None and head != model.head)):
        merge_lora(model).requires_grad_(True)
    if head is not None and head != model.head:
        model = model.with_head(head)
    return model.to(device)


def stage_model(cfg: Config, rt: Runtime, vocab_size: int, head: str, state: dict | None, init: str | Path | None):
    """The model a stage trains, in train mode on rt.device: from the stage's own checkpoint `state`
    when resuming, else from the checkpoint `init` (backbone kept; a new `head` if it differs), else
    freshly initialized."""
    if state is not None:
        model = load_model(state["model"], rt.device)
    elif init:
        from .model_init import init_model_state
        model = load_model(init_model_state(init, head, backend=cfg.run.backend), rt.device, head=head, merge=True)
    else:
        model = build_model(cfg, vocab_size, head=head).to(rt.device)
    return model.train()


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint's state (tensors on CPU); CheckpointError (a ValueError) naming an unreadable file."""
    return checkpoint.load(path)


def save_checkpoint(path: str | Path, rt: Runtime, **state) -> None:
    """Atomically write `state` plus the RNG state (main rank only; every rank waits for it). An older
    run's pickle checkpoint next to it is removed once the new one is in place."""
    if rt.is_main:
        checkpoint.save({**state, "rng": get_rng_state()}, path)
        Path(path).with_name(checkpoint.LEGACY_NAME).unlink(missing_ok=True)
    rt.barrier()


def restore_rng(state: dict) -> None:
    set_rng_state(state["rng"])


def resume_training(state: dict, what: str, optimizers: list, sampler) -> int:
    """Load a stage checkpoint's optimizer, sampler and RNG state; returns the step it was saved at.

    optimizers: [(model, its optimizer, the optimizer's saved state)]. A saved state of None (what FSDP
    runs wrote before their optimizer state was saved) cannot be resumed: ValueError naming the
    checkpoint as `what`.
    """
    if any(saved is None for _, _, saved in optimizers):
        raise ValueError(f"{what} was written by an FSDP run of an older rlhf_fast, which did not save the "
                         "optimizer state: it cannot be resumed; start the stage again")
    for model, opt, saved in optimizers:
        load_optimizer_state(model, opt, saved)
    sampler.load_state_dict(state["sampler"])
    restore_rng(state)
    return state["step"]


def wrap_model(model, rt: Runtime):
    """DDP or FSDP2 (`fully_shard` on every block, then the root) for a model that will be trained."""
    if rt.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if rt.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        # Initialize FSDP with one full forward + backward of a zero loss: generation calls the blocks
        # directly (a block reached first would make itself a root), and a first forward under no_grad
        # (rollout scoring) leaves the root's parameters without their gradient path.
        with torch.enable_grad():
            out = model(torch.zeros((1, 1), dtype=torch.long, device=rt.device))
            (out.float().sum() * 0.0).backward()
        for p in model.parameters():
            p.grad = None
        return model
    return model


def unwrap(model):
    return getattr(model, "module", model)


def full_state_dict(model) -> dict:
    """A plain (unsharded) state dict of a possibly DDP/FSDP-wrapped model."""
    model = unwrap(model)
    sd = model.state_dict()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in sd.items()}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup for `warmup` steps, then cosine decay from `peak` to `peak / 10` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (a LoRA model: its adapters and heads only). torch's fused kernel
    (one pass over all tensors, CPU and CUDA) where it applies: on CPU, where the default is a Python loop
    over the tensors, a 4-layer width-256 GPT's step took 5 ms instead of 25 ms (1 thread). FSDP2's
    DTensor parameters keep torch's default implementation."""
    from torch.distributed.tensor import DTensor
    params = [p for p in unwrap(model).parameters() if p.requires_grad]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95),
                             **({"fused": True} if fused else {}))


def check_finite(stage: str, step: int, **values) -> None:
    """Raise NonFiniteError naming the stage, the step and the offending quantity."""
    for name, v in values.items():
        t = (v if isinstance(v, torch.Tensor) else torch.tensor(float(v))).detach().flatten()
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            where = bad.nonzero().flatten()
            shown = ", ".join(f"[{i}]={t[i].item()}" for i in where[:4].tolist())
            more = f" and {len(where) - 4} more" if len(where) > 4 else ""
            raise NonFiniteError(f"{stage} step {step}: {name} is not finite ({len(where)} of {t.numel()} values: "
                                 f"{shown}{more}); the step was not applied and the last checkpoint is kept")


def clip_and_step(model, opt, grad_clip: float, stage: str, step: int) -> float:
    """Clip the gradient norm, refuse a non-finite gradient, step. Returns the pre-clip norm."""
    params = [p for p in unwrap(model).parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    check_finite(stage, step, grad_norm=norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


def autocast(cfg: Config, device: torch.device):
    if cfg.run.dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def progress(cfg: Config, rt: Runtime, total: int, initial: int, desc: str):
    """A tqdm bar on the main rank (a no-op object elsewhere or with run.progress=false)."""
    if cfg.run.progress and rt.is_main:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
    return _NoBar()


class StageLog:
    """A stage's metrics.jsonl and progress bar; only the main rank writes the log.

    A stage starting at step 0 starts a new log; one resumed at step N drops what was logged after N
    (see ``MetricsLogger``). Call ``close()`` at the end.
    """

    def __init__(self, cfg: Config, rt: Runtime, stage_dir: Path, stage: str, total: int, start: int):
        path = stage_dir / "metrics.jsonl"
        if start == 0 and rt.is_main:
            path.unlink(missing_ok=True)
        self.logger = MetricsLogger(path, resume_step=start) if rt.is_main else None
        self.trackers = []  # run.report_to: copies of every record (tensorboard, wandb)
        if rt.is_main and cfg.run.report_to:
            from .trackers import open_trackers
            self.trackers = open_trackers(cfg.run.report_to, stage_dir, stage, cfg.to_dict(), start)
        self.bar = progress(cfg, rt, total, start, stage)

    def log(self, step: int, **record) -> None:
        if self.logger is not None:
            logged = self.logger.log(step, **record)
            for tracker in self.trackers:
                tracker.log(step, logged)

    def step(self, step: int, record: dict, **postfix: str) -> None:
        """Log `record` for `step` and advance the bar, showing `postfix`."""
        self.log(step, **record)
        self.bar.update()
        self.bar.set_postfix(**postfix)

    def close(self) -> None:
        self.bar.close()
        if self.logger is not None:
            self.logger.close()
        for tracker in self.trackers:
            tracker.close()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass
