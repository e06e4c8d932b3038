"""JSONL data for the three stages, tokenization, packing, and a resumable batch sampler.

Formats (one JSON object per line; extra keys are ignored):

- SFT: ``{"prompt": str, "response": str}``
- reward model: ``{"prompt": str, "chosen": str, "rejected": str}``
- PPO: ``{"prompt": str}``

Data files are JSONL, or Parquet (``*.parquet``, pyarrow) or a ``datasets`` save_to_disk folder
(``hf:DIR``), whose rows are read like JSONL lines (the ``data`` extra installs both).

Instead of "prompt", a line may hold ``"messages": [{"role": ..., "content": ...}, ...]``, rendered by
the tokenizer's chat template (an ``hf:`` tokenizer that has one) with the generation prompt added;
for SFT, a last message of role "assistant" is the response when "response" is absent.

A bad line raises ``ValueError("<file>:<line>: <what is wrong>")``.
Token layout of one example: ``[BOS] prompt response [EOS]`` (a chat prompt is the template's tokens, which
place their own BOS); the SFT loss covers response and EOS only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100

SFT_KEYS = ("prompt", "response")
RM_KEYS = ("prompt", "chosen", "rejected")
PPO_KEYS = ("prompt",)


@dataclass
class Line:
    """One validated JSONL record and where it came from (for error messages)."""
    where: str
    fields: dict


def data_format(cfg, path) -> dict:
    """`read_jsonl`'s names and chat arguments for the data file `path` of a run with config `cfg`: the
    data section's keys (the built-in task's files, in <run.out>/data, keep the defaults) and template."""
    d = cfg.data
    builtin = Path(path).parent == Path(cfg.run.out) / "data"
    names = {} if builtin else {"prompt": d.prompt_key, "response": d.response_key, "chosen": d.chosen_key,
                                "rejected": d.rejected_key}
    return {"names": names, "chat": d.chat_template}


def read_jsonl(path: str | Path, keys: tuple[str, ...], names: dict[str, str] | None = None,
               chat: bool = False) -> list[Line]:
    """Read `path`, checking every line is an object with string values for `keys` (prompt non-empty).

    names: the file's key for each of `keys` (default: the same); chat: a plain-text prompt becomes one
    user message, rendered by the tokenizer's chat template like a "messages" line."""
    names = {k: v for k, v in (names or {}).items() if k in keys and v != k}
    lines = []
    for where, obj in _records(path):
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object with keys {list(keys)}, got {type(obj).__name__}")
        file_keys = [names.get(k, k) for k in keys]
        if names:  # the file's keys under ours; a default-named key it also holds is not read
            obj = {**{k: v for k, v in obj.items() if k not in names},
                   **{k: obj[t] for k, t in names.items() if t in obj}}
        if "messages" in obj and "prompt" not in obj:
            obj = _from_messages(where, obj, keys, file_keys)
            lines.append(Line(where, {k: obj[k] for k in keys}))
            continue
        for key, name in zip(keys, file_keys):
            if key not in obj:
                raise ValueError(f"{where}: missing key {name!r} (expected keys {file_keys})")
            if not isinstance(obj[key], str):
                raise ValueError(f"{where}: {name!r} must be a string, got {type(obj[key]).__name__}")
        if not obj["prompt"]:
            raise ValueError(f"{where}: {file_keys[0]!r} is empty")
        if chat:
            obj["prompt"] = [{"role": "user", "content": obj["prompt"]}]
        lines.append(Line(where, {k: obj[k] for k in keys}))
    if not lines:
        raise ValueError(f"data file {str(path)!r} has no records")
    return lines


def _records(path):
    """(where, record) of each record of a data file: JSONL lines ("file:line"), the rows of a .parquet
    file or of a `datasets` save_to_disk folder given as "hf:DIR" ("file:row N")."""
    spec = str(path)
    if spec.startswith("hf:") or spec.endswith(".parquet"):
        for i, row in enumerate(_table_rows(spec), 1):
            yield f"{spec}:row {i}", row
        return
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {spec!r} does not exist")
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                try:
                    yield f"{path}:{lineno}", json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None


def _table_rows(spec: str) -> list[dict]:
    """The rows of a Parquet file (pyarrow) or a save_to_disk folder "hf:DIR" (datasets), as dicts."""
    extra = "pip install 'rlhf_fast[data]'"
    if spec.startswith("hf:"):
        folder = Path(spec[3:])
        if not folder.is_dir():
            raise ValueError(f"data {spec!r}: {str(folder)!r} is not a folder (a datasets save_to_disk output)")
        try:
            import datasets
        except ImportError:
            raise ValueError(f"data {spec!r} needs the datasets package: {extra}") from None
        ds = datasets.load_from_disk(str(folder))
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"data {spec!r} holds the splits {list(ds)}: name one, e.g. hf:{folder / list(ds)[0]}")
        return list(ds)
    if not Path(spec).is_file():
        raise ValueError(f"data file {spec!r} does not exist")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"data file {spec!r} is Parquet, which needs pyarrow: {extra}") from None
    return pq.read_table(spec).to_pylist()


def _from_messages(where: str, obj: dict, keys: tuple[str, ...], file_keys: list[str]) -> dict:
    """A {"messages": [...]} line -> its fields, "prompt" being the list of messages."""
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    obj = {**obj, "prompt": messages}
    if "response" in keys and "response" not in obj and messages[-1]["role"] == "assistant":
        obj.update(prompt=messages[:-1], response=messages[-1]["content"])
    if not obj["prompt"]:
        raise ValueError(f"{where}: 'messages' holds no prompt before the assistant's response")
    for key, name in zip(keys, file_keys):
        if key == "prompt":
            continue
        if not isinstance(obj.get(key), str):
            raise ValueError(f"{where}: missing string {name!r} (expected keys {file_keys} with 'messages' "
                             f"in place of {file_keys[0]!r})")
    return obj


def prompt_ids(tok, prompt, where: str = "") -> list[int]:
    """[BOS] + the prompt's tokens, or a message list rendered by the tokenizer's chat template."""
    if isinstance(prompt, str):
        return [tok.bos_id] + tok.encode(prompt)
    if not hasattr(tok, "chat_prompt"):
        raise ValueError(f"{where}: 'messages' need run.tokenizer='hf:<dir>' with a chat template, "
                         f"got tokenizer {tok.name!r}")
    return tok.chat_prompt(prompt)


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write `records` atomically (temp file in the same folder, then rename)."""
    from .run_io import atomic_write_text
    atomic_write_text("".join(json.dumps(r) + "\n" for r in records), path)


def _check_len(where: str, n: int, limit: int, what: str) -> None:
    if n > limit:
        raise ValueError(f"{where}: {what} is {n} tokens, longer than the model's block_size budget of {limit}")


def tokenize_sft(lines: list[Line], tok, block_size: int) -> list[tuple[list[int], int]]:
    """Each line -> (tokens [BOS] prompt response [EOS], number of prompt tokens including BOS)."""
    out = []
    for line in lines:
        prompt = prompt_ids(tok, line.fields["prompt"], line.where)
        ids = prompt + tok.encode(line.fields["response"]) + [tok.eos_id]
        _check_len(line.where, len(ids), block_size + 1, "prompt + response")
        out.append((ids, len(prompt)))
    return out


def tokenize_pairs(lines: list[Line], tok, block_size: int) -> list[tuple[list[int], list[int]]]:
    """Each line -> (chosen tokens, rejected tokens), both [BOS] prompt answer [EOS]."""
    out = []
    for line in lines:
        prompt = prompt_ids(tok, line.fields["prompt"], line.where)
        pair = tuple(prompt + tok.encode(line.fields[k]) + [tok.eos_id] for k in ("chosen", "rejected"))
        _check_len(line.where, max(map(len, pair)), block_size, "prompt + answer")
        out.append(pair)
    return out


def tokenize_prompts(lines: list[Line], tok, block_size: int, max_new_tokens: int) -> list[list[int]]:
    """Each line -> [BOS] prompt, checked to leave room for `max_new_tokens`."""
    out = []
    for line in lines:
        ids = prompt_ids(tok, line.fields["prompt"], line.where)
        _check_len(line.where, len(ids) + max_new_tokens, block_size, f"prompt + max_new_tokens ({max_new_tokens})")
        out.append(ids)
    return out


def sft_batch(examples: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """Pack SFT examples into one row with no padding.

    Returns input_ids (T,), targets (T,) (IGNORE_INDEX on prompt positions), cu_seqlens (n+1,) int32
    boundaries of the packed sequences and max_seqlen (int).
    """
    inputs, targets, lens = [], [], []
    for ids, n_prompt in examples:
        inputs += ids[:-1]
        targets += [IGNORE_INDEX] * (n_prompt - 1) + ids[n_prompt:]
        lens.append(len(ids) - 1)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return {"input_ids": torch.tensor(inputs), "targets": torch.tensor(targets),
            "cu_seqlens": cu, "max_seqlen": max(lens)}


def sft_padded_batch(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """SFT examples right-padded: input_ids, targets (IGNORE_INDEX on prompt and padding), attention_mask, (B, L)."""
    inputs, lens = right_pad([ids[:-1] for ids, _ in examples], pad_id)
    targets, _ = right_pad([[IGNORE_INDEX] * (n - 1) + ids[n:] for ids, n in examples], IGNORE_INDEX)
    mask = (torch.arange(inputs.shape[1])[None, :] < lens[:, None]).long()
    return {"input_ids": inputs, "targets": targets, "attention_mask": mask}


def sequence_batch(seqs: list[list[int]], pad_id: int, packed: bool, device) -> tuple[torch.Tensor, dict]:
    """Whole sequences as model input: (idx, layout kwargs).

    packed: idx (T,) with cu_seqlens (n+1,) int32 and max_seqlen; else idx (n, L) right-padded with
    attention_mask. Either way a reward head reads each sequence's last real token.
    """
    if packed:
        lens = [len(s) for s in seqs]
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lens), 0)
        idx = torch.tensor([t for s in seqs for t in s])
        return idx.to(device), {"cu_seqlens": cu.to(device), "max_seqlen": max(lens)}
    idx, lens = right_pad(seqs, pad_id)
    mask = (torch.arange(idx.shape[1])[None, :] < lens[:, None]).long()
    return idx.to(device), {"attention_mask": mask.to(device)}


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) tokens right-padded with pad_id, and lengths (B,)."""
    lens = torch.tensor([len(s) for s in seqs])
    out = torch.full((len(seqs), int(lens.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s)
    return out, lens


class BatchSampler:
    """Shuffled index batches over `n` examples, epoch after epoch, resumable from `state_dict()`.

    The order depends only on (seed, epoch), so a resumed run sees the same batches as an uninterrupted
    one. Every rank draws the same global batch; callers take their shard.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise ValueError(f"batch_size ({batch_size}) is larger than the dataset ({n} examples)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def next(self) -> list[int]:
        if self.pos + self.batch_size > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation()
        batch = self._perm[self.pos:self.pos + self.batch_size].tolist()
        self.pos += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation()
