"""Hugging Face folders as stage inits are checked before the run directory is touched (config.json and
safetensors headers only, through the loader's own config mapping), and a stage started from one records
the architecture it trains."""
import json
import shutil

import pytest
import transformers as T

from rlhf_fast import cli
from rlhf_fast.model import GPTConfig
from rlhf_fast.model.hf import config_from_hf
from rlhf_fast.rlhf import run_dir
from rlhf_fast.rlhf.config import build_config, load_file, save_config

from .test_export_pipeline import _char_tokenizer, _llama_folder
from .test_pipeline import TINY, tiny


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    llama = _llama_folder(root / "llama")
    seq_cls = root / "reward"
    T.LlamaForSequenceClassification(T.LlamaConfig.from_pretrained(llama, num_labels=1)).save_pretrained(seq_cls)
    return {"llama": llama, "reward": seq_cls, "tok": f"hf:{_char_tokenizer(root / 'tok')}"}


def _edited(folders, tmp_path, edit):
    folder = tmp_path / "edited"
    shutil.copytree(folders["llama"], folder)
    edit(folder)
    return folder


def _set(**changes):
    def edit(folder):
        hf = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**hf, **changes}))
    return edit


BAD_FOLDERS = [  # (edit of a valid Llama folder, what the one-line error says)
    (lambda f: shutil.rmtree(f), "does not exist"),
    (lambda f: (f / "config.json").unlink(), "is a folder without config.json"),
    (lambda f: (f / "config.json").write_text("{'model_type': 'llama'"), "config.json is not readable JSON"),
    (_set(model_type="gemma"), "config.model_type must be one of"),
    (_set(hidden_act="gelu"), "config.hidden_act='gelu' is not supported"),
    (_set(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}),
     "config.rope_parameters.rope_type='yarn' is not supported"),
    (_set(mlp_bias=True), "config.mlp_bias=True is not supported"),
    (lambda f: (f / "model.safetensors").unlink(), "has no model.safetensors"),
]


@pytest.mark.parametrize("edit,message", BAD_FOLDERS, ids=["missing", "no_config", "bad_json", "model_type",
                                                           "hidden_act", "rope_type", "mlp_bias", "no_weights"])
def test_unusable_hf_init_is_refused_before_the_run_directory_exists(folders, tmp_path, device, capsys, edit,
                                                                     message):
    folder = _edited(folders, tmp_path, edit)
    out = tmp_path / "run"
    rc = cli.main(["sft", "--out", str(out), f"--run.device={device}", f"--run.tokenizer={folders['tok']}",
                   f"--model.init={folder}", *(f"--{k}={v}" for k, v in TINY.items())])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith(f"rlhf-fast sft: error: model.init={str(folder)!r}") and message in err
    assert "\n" not in err and not out.exists()


def test_hf_init_heads_and_vocabulary_are_checked(folders, tmp_path, device):
    llama, reward, tok = str(folders["llama"]), str(folders["reward"]), folders["tok"]
    cases = [  # (config overrides, stage, what the error says)
        ({"model.init": llama}, "sft", f"model.init={llama!r}: its model has vocab_size 103, but "
                                        "run.tokenizer='byte' has 259 ids"),
        ({"model.init": reward, "run.tokenizer": tok}, "sft", "holds a model with head 'reward', expected 'lm'"),
        ({"ppo.policy_init": llama, "ppo.reward_init": llama, "run.tokenizer": tok}, "ppo",
         f"ppo.reward_init={llama!r}: {llama!r} holds a model with head 'lm', expected 'reward'"),
        ({"rm.init": reward, "run.tokenizer": tok}, "rm", "rm.norm_samples=8 samples responses from rm.init's"),
    ]
    for overrides, stage, message in cases:
        with pytest.raises(ValueError) as info:
            run_dir.preflight(tiny(tmp_path / "run", device, **overrides), stage, False, False)
        assert message in str(info.value)
    plan = run_dir.preflight(tiny(tmp_path / "run", device, **{"rm.init": reward, "run.tokenizer": tok,
                                                                 "rm.norm_samples": 0}), "rm", False, False)
    assert plan.cfg.model.n_embd == 48 and not (tmp_path / "run").exists()


def test_stage_from_hf_folder_records_the_architecture_it_trains(folders, tmp_path, device):
    cfg = tiny(tmp_path / "run", device, **{"model.init": str(folders["llama"]), "run.tokenizer": folders["tok"]})
    plan = run_dir.preflight(cfg, "sft", False, False)
    m = plan.cfg.model
    assert (m.n_layer, m.n_head, m.n_kv_head, m.n_embd, m.head_dim, m.block_size) == (1, 3, 1, 48, 24, 64)
    assert (m.pos_emb, m.norm, m.mlp, m.bias, m.qkv_bias, m.family, m.init) == \
        ("rope", "rmsnorm", "swiglu", False, "false", "llama", str(folders["llama"]))
    # the recorded section rebuilds the very GPTConfig the loader makes of config.json (score head as trained)
    want = config_from_hf(json.loads((folders["llama"] / "config.json").read_text()), backend=cfg.run.backend)
    assert GPTConfig(**m.gpt_config_kwargs(), vocab_size=103, backend=cfg.run.backend) == want
    save_config(plan.cfg, tmp_path / "config.yaml")  # what --resume reads back validates and is the same
    assert build_config(None, None, base=load_file(tmp_path / "config.yaml")).model == m
