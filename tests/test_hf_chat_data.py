"""Chat data: {"messages": [...]} JSONL lines rendered by an hf: tokenizer's chat template."""
import json
import string

import pytest
import transformers as T

from rlhf_fast.rlhf.data import PPO_KEYS, RM_KEYS, SFT_KEYS, read_jsonl, tokenize_pairs, tokenize_prompts, tokenize_sft
from rlhf_fast.rlhf.tokenizer import get_tokenizer

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(string.printable)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("<s>|</s>|."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = TEMPLATE
    folder = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(folder)
    return get_tokenizer(f"hf:{folder}"), T.AutoTokenizer.from_pretrained(folder)


def _write(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_messages_are_rendered_by_the_chat_template(chat_tok, tmp_path):
    tok, hf = chat_tok
    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort 31"}]
    expected = hf.encode("<s>system:be brief\n<s>user:sort 31\n<s>assistant:", add_special_tokens=False)
    assert expected[0] == 1 and expected.count(1) == 3  # the template's <s> are the BOS id, not characters
    path = _write(tmp_path / "p.jsonl", {"messages": convo}, {"prompt": "plain"})
    prompts = tokenize_prompts(read_jsonl(path, PPO_KEYS), tok, 64, 4)
    assert prompts == [expected, [tok.bos_id] + tok.encode("plain")]
    sft = _write(tmp_path / "s.jsonl", {"messages": convo + [{"role": "assistant", "content": "13"}]})
    [(ids, n_prompt)] = tokenize_sft(read_jsonl(sft, SFT_KEYS), tok, 64)
    assert ids == expected + tok.encode("13") + [tok.eos_id] and n_prompt == len(expected)
    pairs = _write(tmp_path / "r.jsonl", {"messages": convo, "chosen": "13", "rejected": "31"})
    [(chosen, rejected)] = tokenize_pairs(read_jsonl(pairs, RM_KEYS), tok, 64)
    assert chosen[:len(expected)] == rejected[:len(expected)] == expected


@pytest.mark.parametrize("record,message", [
    ({"messages": [{"role": "user"}]}, "'messages' must be a non-empty list"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "'messages' holds no prompt before"),
])
def test_bad_messages_name_the_line(record, message, tmp_path):
    with pytest.raises(ValueError, match=f"s.jsonl:1: {message}"):
        read_jsonl(_write(tmp_path / "s.jsonl", record), SFT_KEYS)


def test_messages_need_a_tokenizer_with_a_chat_template(tmp_path):
    path = _write(tmp_path / "p.jsonl", {"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(ValueError, match="p.jsonl:1: 'messages' need run.tokenizer='hf:<dir>'"):
        tokenize_prompts(read_jsonl(path, PPO_KEYS), get_tokenizer("byte"), 64, 4)


def test_data_keys_and_chat_template_for_plain_prompts(chat_tok, tmp_path):
    from rlhf_fast.rlhf.config import build_config
    from rlhf_fast.rlhf.data import data_format
    tok, hf = chat_tok
    cfg = build_config(None, {"run.out": str(tmp_path / "run"), "data.prompt_key": "question",
                              "data.response_key": "answer", "data.chat_template": "true"})
    path = _write(tmp_path / "s.jsonl", {"question": "sort 31", "answer": "13", "prompt": "not read"})
    fmt = data_format(cfg, path)
    [(ids, n_prompt)] = tokenize_sft(read_jsonl(path, SFT_KEYS, **fmt), tok, 64)
    expected = hf.encode("<s>user:sort 31\n<s>assistant:", add_special_tokens=False)
    assert ids == expected + tok.encode("13") + [tok.eos_id] and n_prompt == len(expected)
    with pytest.raises(ValueError, match=r"s.jsonl:1: missing key 'question' \(expected keys \['question', 'answer'\]"):
        read_jsonl(_write(path, {"prompt": "sort 31", "answer": "13"}), SFT_KEYS, **fmt)
    with pytest.raises(ValueError, match="s.jsonl:1: missing string 'answer'"):
        read_jsonl(_write(path, {"messages": [{"role": "user", "content": "x"}], "response": "y"}), SFT_KEYS, **fmt)
    builtin = data_format(cfg, tmp_path / "run" / "data" / "sft.jsonl")  # the built-in task's files: default keys
    assert builtin["names"] == {} and builtin["chat"]
    with pytest.raises(ValueError, match="must be non-empty and distinct"):
        build_config(None, {"data.chosen_key": "rejected"})
    from rlhf_fast.cli import parse
    for stage in ("sft", "rm", "ppo", "demo"):
        assert parse([stage, "--out", str(tmp_path), "--data.prompt_key=q", "--data.chat_template=true"])[1].data \
            .prompt_key == "q"


def test_chat_template_end_of_turn_token_ends_responses(tmp_path):
    """A template that closes each turn with a special token: the pipeline stops responses at it too."""
    import torch
    import types

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from rlhf_fast.rlhf import rollout
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<|end|>": 3, **{c: i + 4 for i, c in enumerate(string.printable)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("<s>|</s>|<\\|end\\|>|."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                     additional_special_tokens=["<|end|>"])
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}<|end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(tmp_path)
    tok = get_tokenizer(f"hf:{tmp_path}")
    assert tok.stop_ids == (2, 3)
    a, b = tok.encode("a"), tok.encode("b")
    tokens = torch.tensor([[a[0], 3, b[0]], [a[0], b[0], 2], [b[0], b[0], a[0]]])
    cut, logprobs, mask = rollout._stop_at_eos(tokens, torch.ones(3, 3), tok.stop_ids, tok.pad_id)
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 1]] and cut[0, 2] == tok.pad_id and logprobs[0, 2] == 0
    assert rollout.decode_rows(tok, torch.cat((torch.ones(3, 1, dtype=torch.long), cut), 1), mask, 1)[1] == \
        ["a", "ab", "bba"]

    class Policy:  # records what generate_chunk asks the model to stop at
        def generate(self, idx, n, **kwargs):
            self.eos = kwargs["eos_token_id"]
            z = torch.zeros(idx.shape[0], n, dtype=torch.long)
            return types.SimpleNamespace(tokens=z, logprobs=z.float(), mask=z)
    policy = Policy()
    rollout.generate_chunk(policy, [[1, 5]], 2, tok, max_new_tokens=2, temperature=1.0, top_k=0, top_p=1.0, seed=0,
                           device="cpu")
    assert policy.eos == [2, 3]
    assert get_tokenizer("byte").stop_ids == (258,)


def test_parquet_and_save_to_disk_rows_read_like_jsonl_lines(tmp_path, monkeypatch):
    """Integration with pyarrow and datasets through stand-ins that hand back rows as those libraries do
    (Table.to_pylist, iterating a Dataset); without the packages the error names the extra to install."""
    import sys
    import types
    rows = [{"prompt": "sort 31", "response": "13"}, {"prompt": "sort 2", "response": 7}]
    parquet = tmp_path / "s.parquet"
    parquet.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ValueError, match=r"is Parquet, which needs pyarrow: pip install 'rlhf_fast\[data\]'"):
        read_jsonl(parquet, SFT_KEYS)
    pq = types.SimpleNamespace(read_table=lambda p: types.SimpleNamespace(to_pylist=lambda: rows[:1]))
    monkeypatch.setitem(sys.modules, "pyarrow", types.SimpleNamespace(parquet=pq))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", pq)
    [line] = read_jsonl(parquet, SFT_KEYS)
    assert line.fields == rows[0] and line.where == f"{parquet}:row 1"

    class DatasetDict(dict):
        pass
    saved = {tmp_path / "ds": rows, tmp_path / "splits": DatasetDict(train=rows)}
    (tmp_path / "ds").mkdir()
    (tmp_path / "splits").mkdir()
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        DatasetDict=DatasetDict, load_from_disk=lambda p: saved[type(tmp_path)(p)]))
    with pytest.raises(ValueError, match=f"hf:{tmp_path / 'ds'}:row 2: 'response' must be a string, got int"):
        read_jsonl(f"hf:{tmp_path / 'ds'}", SFT_KEYS)
    with pytest.raises(ValueError, match=r"holds the splits \['train'\]: name one, e.g. hf:.*splits/train"):
        read_jsonl(f"hf:{tmp_path / 'splits'}", SFT_KEYS)
    with pytest.raises(ValueError, match="is not a folder"):
        read_jsonl(f"hf:{tmp_path / 'nope'}", SFT_KEYS)
