"""Built-in task, JSONL data, tokenizer, config and CLI: fast checks, no model."""
import dataclasses
import json
import random

import pytest

from rlhf_fast import cli
from rlhf_fast.rlhf.config import SECTIONS, build_config, field_help, PPOConfig
from rlhf_fast.rlhf.data import (IGNORE_INDEX, PPO_KEYS, RM_KEYS, SFT_KEYS, BatchSampler, read_jsonl,
                                 sequence_batch, sft_batch, sft_padded_batch, tokenize_prompts, tokenize_sft)
from rlhf_fast.rlhf.task import SortTask, task_reward, write_task_data
from rlhf_fast.rlhf.tokenizer import ByteTokenizer, get_tokenizer


def test_task_scorer_and_imperfect_data(tmp_path):
    task = SortTask(3, 5)
    assert task.score("sort:3915=", "1359") == 1.0
    assert task.score("sort:3915=", "1395") == 0.0
    assert task.score("hello", "1359") == 0.0
    rng = random.Random(0)
    sft = task.sft_records(2000, 0.4, rng)
    right = sum(task.score(r["prompt"], r["response"]) for r in sft) / len(sft)
    assert 0.55 < right < 0.65  # demonstrations are wrong 40% of the time: SFT sits below the ceiling
    pairs = task.preference_records(2000, 0.1, rng)
    agree = sum(task.score(p["prompt"], p["chosen"]) > task.score(p["prompt"], p["rejected"]) for p in pairs)
    assert 0.86 < agree / len(pairs) < 0.94  # 10% label noise
    paths = write_task_data(tmp_path, seed=1, min_digits=3, max_digits=4, n_sft=5, n_pairs=4, n_eval_pairs=3,
                            n_prompts=6, n_eval_prompts=2, demo_error_rate=0.4, label_noise=0.1)
    assert len(read_jsonl(paths["sft"], SFT_KEYS)) == 5
    assert len(read_jsonl(paths["rm_eval"], RM_KEYS)) == 3
    evals = read_jsonl(paths["rm_eval"], RM_KEYS)
    assert all(task.score(e.fields["prompt"], e.fields["chosen"]) == 1.0 for e in evals)  # held-out labels clean
    assert task_reward(["sort:21=", "sort:21="], ["12", "21"]) == [1.0, 0.0]


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"prompt": "a"}', "missing key 'response'"),
    ('{"prompt": "a", "response": 3}', "'response' must be a string"),
    ('{"prompt": "", "response": "x"}', "'prompt' is empty"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"sft\.jsonl:3: .*{message}"):
        read_jsonl(path, SFT_KEYS)


def test_missing_file_and_too_long_examples(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl", PPO_KEYS)
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "short"}\n{"prompt": "' + "x" * 40 + '"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: prompt \+ max_new_tokens"):
        tokenize_prompts(read_jsonl(path, PPO_KEYS), ByteTokenizer(), block_size=32, max_new_tokens=8)


def test_tokenizer_and_batches_mask_the_prompt():
    tok = get_tokenizer("byte")
    assert tok.decode(tok.encode("sort:31=") + [tok.eos_id]) == "sort:31="
    with pytest.raises(ValueError, match="tokenizer must be"):
        get_tokenizer("bpe")
    lines = [type("L", (), {"where": "x:1", "fields": {"prompt": "ab", "response": "c"}})(),
             type("L", (), {"where": "x:2", "fields": {"prompt": "d", "response": "ef"}})()]
    ex = tokenize_sft(lines, tok, block_size=16)
    packed = sft_batch(ex)
    # [BOS a b c EOS] -> inputs BOS a b c, targets: only c and EOS are trained
    assert packed["targets"][:4].tolist() == [IGNORE_INDEX, IGNORE_INDEX, ord("c"), tok.eos_id]
    assert packed["cu_seqlens"].tolist() == [0, 4, 8]
    padded = sft_padded_batch(ex, tok.pad_id)
    assert padded["targets"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, ord("c"), tok.eos_id],
                                          [IGNORE_INDEX, ord("e"), ord("f"), tok.eos_id]]
    idx, layout = sequence_batch([[1, 2, 3], [4]], tok.pad_id, packed=False, device="cpu")
    assert idx.tolist() == [[1, 2, 3], [4, tok.pad_id, tok.pad_id]]
    assert layout["attention_mask"][1].tolist() == [1, 0, 0]


def test_batch_sampler_resumes_exactly():
    a = BatchSampler(10, 4, seed=3)
    first = [a.next() for _ in range(3)]
    state = a.state_dict()
    rest = [a.next() for _ in range(4)]
    b = BatchSampler(10, 4, seed=3)
    b.load_state_dict(state)
    assert [b.next() for _ in range(4)] == rest
    assert all(len(set(x)) == 4 for x in first + rest)
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(3, 4, seed=0)


def test_config_file_overrides_and_errors(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"ppo": {"kl_coef": 0.2, "kl_kind": "k3"}, "model": {"n_layer": 3}}))
    cfg = build_config(path, {"ppo.kl_coef": "0.5", "run.progress": "false"})
    assert (cfg.ppo.kl_coef, cfg.ppo.kl_kind, cfg.model.n_layer, cfg.run.progress) == (0.5, "k3", 3, False)
    yml = tmp_path / "c.yaml"
    yml.write_text("sft:\n  lr: 0.01\n")
    assert build_config(yml).sft.lr == 0.01
    cases = [
        ({"ppo.kl_coeff": 1}, r"unknown config field 'ppo.kl_coeff'; ppo has fields \[.*'kl_coef'"),
        ({"ppx.lr": 1}, r"unknown config key 'ppx.lr'.*'ppo'"),
        ({"ppo.kl_kind": "k4"}, r"ppo.kl_kind must be one of \['k1', 'k2', 'k3', 'full'\]"),
        ({"ppo.steps": "many"}, "ppo.steps must be an integer"),
        ({"ppo.steps": 0}, r"ppo.steps must be > 0"),
        ({"ppo.adaptive_kl": "maybe"}, "ppo.adaptive_kl must be a boolean"),
        ({"task.label_noise": 1.5}, r"task.label_noise must be in \[0, 1\]"),
        ({"ppo.minibatch_size": 48}, "minibatch_size"),
        ({"ppo.reward_mode": "fn"}, "needs ppo.reward_fn"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            build_config(None, overrides)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optim": {"lr": 1}}))
    with pytest.raises(ValueError, match="unknown config section 'optim'"):
        build_config(bad)


def test_cli_help_documents_fields_and_errors_exit_2(capsys):
    assert "per-token KL estimator" in field_help(PPOConfig)["kl_kind"]
    with pytest.raises(SystemExit):
        cli.main(["ppo", "--help"])
    out = capsys.readouterr().out
    assert "--ppo.kl_coef FLOAT" in out and "KL penalty coefficient" in out and "--sft.lr" not in out
    assert cli.main(["ppo", "--ppo.kl_cof=1"]) == 2
    assert "unknown config field 'ppo.kl_cof'" in capsys.readouterr().err
    assert cli.main(["rm", "--resume", "/nonexistent/run"]) == 2
    stage, cfg, resume, _ = cli.parse(["demo", "--out", "runs/x", "--ppo.top_p", "0.9"])
    assert (stage, cfg.run.out, cfg.ppo.top_p, resume) == ("demo", "runs/x", 0.9, False)


def test_every_field_has_help_and_inherited_fields_keep_their_stage_default(capsys):
    for section, cls in SECTIONS.items():
        docs = field_help(cls)
        assert all(docs.get(f.name) for f in dataclasses.fields(cls)), section
    with pytest.raises(SystemExit):
        cli.main(["rm", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert "--rm.lr FLOAT peak learning rate (AdamW), linear warmup then cosine decay to lr/10 (default: 0.001)" in out
    assert "--rm.ckpt_every INT steps between checkpoints (and at the end) (default: 100)" in out
    assert build_config(None, {"sft.lr": "0.01"}).rm.lr == 1e-3


def test_local_hf_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<pad>": 0, "</s>": 1, "sort": 2, "1": 3, "2": 4, "[UNK]": 5}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>",
                                         unk_token="[UNK]").save_pretrained(tmp_path)
    tok = get_tokenizer(f"hf:{tmp_path}")
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.bos_id) == (6, 1, 0, 1)  # no BOS token: EOS doubles
    assert tok.encode("sort 2 1") == [2, 4, 3]
    assert tok.decode([2, 4, 3, 1]).split() == ["sort", "2", "1"]
