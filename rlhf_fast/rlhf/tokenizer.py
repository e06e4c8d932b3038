"""Tokenizers for the pipeline: byte-level by default, tiktoken or a local Hugging Face tokenizer optional.

Every tokenizer exposes the same small interface: ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``,
``stop_ids`` (EOS and, for a chat template, the token that ends the assistant's turn: a response ends at
any of them), ``encode(text) -> list[int]`` (no special tokens added) and ``decode(ids) -> str`` (special
tokens dropped). ``get_tokenizer(spec)`` builds one from a config string:

- ``"byte"``: the 256 byte values, then PAD, BOS, EOS (vocab 259). Needs nothing, never fails on text.
- ``"tiktoken:<encoding>"``: e.g. ``tiktoken:gpt2``; EOS = BOS = PAD = the encoding's end-of-text token.
- ``"hf:<local dir>"``: ``transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)``.
"""
from __future__ import annotations

from collections.abc import Iterable


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; PAD = 256, BOS = 257, EOS = 258."""

    pad_id = 256
    bos_id = 257
    eos_id = 258
    stop_ids = (258,)
    vocab_size = 259
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    """A tiktoken encoding; its end-of-text token doubles as BOS, EOS and PAD."""

    def __init__(self, encoding: str):
        import tiktoken
        self._enc = tiktoken.get_encoding(encoding)
        self.name = f"tiktoken:{encoding}"
        self.vocab_size = self._enc.n_vocab
        self.eos_id = self.bos_id = self.pad_id = self._enc.eot_token
        self.stop_ids = (self.eos_id,)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids if int(i) != self.eos_id])


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local folder (no download)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.name = f"hf:{path}"
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"tokenizer: {path} defines no eos_token; the pipeline needs one to end responses")
        self.bos_id = self._tok.bos_token_id if self._tok.bos_token_id is not None else self.eos_id
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id
        self.stop_ids = (self.eos_id, *(t for t in self._end_of_turn() if t != self.eos_id))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def _end_of_turn(self) -> list[int]:
        """The special tokens the chat template writes right after an assistant message's content (Qwen's
        <|im_end|>, Llama 3's <|eot_id|>): a chat model ends its turn with them rather than with EOS."""
        if not self._tok.chat_template:
            return []
        mark = "\u2063end-of-turn probe\u2063"
        convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}]
        try:
            text = self._tok.apply_chat_template(convo, tokenize=False)
        except Exception as exc:  # jinja raises its own error types from a template's raise_exception
            raise ValueError(f"tokenizer: {self.name}: its chat template cannot render a user/assistant "
                             f"exchange ({exc})") from None
        if mark not in text:  # a template that leaves the assistant's message out has no turn end to find
            return []
        after = self._tok.encode(text[text.rindex(mark) + len(mark):], add_special_tokens=False)
        special = set(self._tok.all_special_ids) | set(self._tok.added_tokens_decoder)
        ids = []
        for t in after:  # the leading special tokens; whitespace or text after them is not part of the stop
            if t not in special:
                break
            ids.append(t)
        return ids

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` rendered by the chat template, ending with the assistant's turn opener."""
        if not self._tok.chat_template:
            raise ValueError(f"tokenizer: {self.name} has no chat template, needed for 'messages' data")
        text = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self._tok.encode(text, add_special_tokens=False)


def get_tokenizer(spec: str = "byte"):
    """Build the tokenizer named by `spec` ("byte", "tiktoken:<encoding>" or "hf:<local dir>")."""
    if spec == "byte":
        return ByteTokenizer()
    kind, _, arg = spec.partition(":")
    if kind == "tiktoken" and arg:
        return TiktokenTokenizer(arg)
    if kind == "hf" and arg:
        return HFTokenizer(arg)
    raise ValueError(f"tokenizer must be 'byte', 'tiktoken:<encoding>' or 'hf:<local dir>', got {spec!r}")
