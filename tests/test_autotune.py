"""The autotune cache (rlhf_fast/ops/_autotune.py), on CPU with a fake timer standing in for do_bench and
a fake GPU description standing in for the device: what is timed, what is cached where, and when the
table pick is used without timing."""
import json
import os

import pytest
import torch

from rlhf_fast.ops import _autotune

CANDIDATES = ((16, 64, 8, 2), (32, 128, 4, 5), (64, 64, 4, 3))  # table pick first
ENV = {"gpu": "NVIDIA H200", "driver": "580.65.06", "cuda": "13.0", "triton": "3.6.0", "torch": "2.11.0",
       "rlhf_fast": "0.1.0"}
CUDA = torch.device("cuda")  # only described: nothing runs on it


class FakeTimer:
    """timer(fn) -> ms: runs fn (one launch) and returns the time given for the config it launched."""

    def __init__(self, ms):
        self.ms, self.timed, self.launched = ms, [], []

    def run(self, cfg):
        self.launched.append(cfg)

    def __call__(self, fn):
        fn()
        cfg = self.launched[-1]
        self.timed.append(cfg)
        return self.ms[cfg]


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv(_autotune.ENV_DIR, str(tmp_path))
    monkeypatch.delenv(_autotune.ENV_ENABLE, raising=False)
    monkeypatch.delenv(_autotune.ENV_BUDGET, raising=False)
    _autotune.reset()
    yield
    _autotune.reset()


def _choose(timer, *, env=ENV, regime="D=128,bf16", candidates=CANDIDATES, device=CUDA):
    return _autotune.choose("attn_fwd", regime, candidates, timer.run, device, timer=timer, env=env)


def test_fastest_is_chosen_cached_and_read_back_by_a_later_process(tmp_path, capsys):
    timer = FakeTimer({CANDIDATES[0]: 3.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 2.0})
    assert _choose(timer) == CANDIDATES[1]
    assert timer.timed == list(CANDIDATES)  # every candidate, the table pick first
    files = list(tmp_path.glob("attn_fwd-*.json"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    data = json.loads(files[0].read_text())
    assert data["winner"] == list(CANDIDATES[1]) and data["key"]["gpu"] == "NVIDIA H200"
    assert data["timings_ms"] == {"16,64,8,2": 3.0, "32,128,4,5": 1.0, "64,64,4,3": 2.0}
    err = capsys.readouterr().err
    assert err.count("rlhf_fast autotune: attn_fwd [D=128,bf16]: 3 configs in") == 1, err

    assert _choose(timer) == CANDIDATES[1] and len(timer.timed) == 3  # same process: from memory
    _autotune.reset()  # a later process
    later = FakeTimer({c: 1.0 for c in CANDIDATES})
    assert _choose(later) == CANDIDATES[1] and later.timed == []
    assert capsys.readouterr().err == ""  # tuning time is printed once, when tuning happens


@pytest.mark.parametrize("field", ["gpu", "driver", "cuda", "triton", "torch", "rlhf_fast"])
def test_cache_key_changes_with_every_version_and_the_gpu(field):
    base = _autotune.cache_path(_autotune.cache_key(ENV, "attn_fwd", "D=128,bf16", CANDIDATES))
    changed = _autotune.cache_path(_autotune.cache_key({**ENV, field: "other"}, "attn_fwd", "D=128,bf16", CANDIDATES))
    assert changed != base and changed.name.startswith("attn_fwd-")


def test_cache_key_changes_with_regime_kernel_and_tuning_set():
    paths = {_autotune.cache_path(_autotune.cache_key(ENV, k, r, c)) for k, r, c in [
        ("attn_fwd", "D=128,bf16", CANDIDATES), ("attn_fwd", "D=64,bf16", CANDIDATES),
        ("attn_bwd_dq", "D=128,bf16", CANDIDATES), ("attn_fwd", "D=128,bf16", CANDIDATES[:2])]}
    assert len(paths) == 4


def test_cache_is_written_atomically(tmp_path, monkeypatch):
    """The file appears whole through os.replace of a temporary file, or not at all."""
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        assert json.loads(open(src).read())["winner"] == [32, 128, 4, 5]  # complete before it is moved
        replaced.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(_autotune.os, "replace", spy)
    _choose(FakeTimer({CANDIDATES[0]: 3.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 2.0}))
    assert len(replaced) == 1 and str(replaced[0][1]).startswith(str(tmp_path))

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(_autotune.os, "replace", fail)
    _autotune.reset()
    with pytest.raises(OSError, match="disk full"):
        _choose(FakeTimer({c: 1.0 for c in CANDIDATES}), regime="D=64,bf16")
    assert len(list(tmp_path.iterdir())) == 1  # the first file only: no partial or temporary file left


def test_autotune_0_launches_the_table_pick_untimed(tmp_path, monkeypatch):
    monkeypatch.setenv(_autotune.ENV_ENABLE, "0")
    timer = FakeTimer({CANDIDATES[0]: 3.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 2.0})
    assert _choose(timer) == CANDIDATES[0] and timer.timed == [] and not list(tmp_path.iterdir())
    monkeypatch.setenv(_autotune.ENV_ENABLE, "yes")
    with pytest.raises(ValueError, match="RLHF_FAST_AUTOTUNE must be 0 or 1"):
        _choose(timer)


def test_cpu_tensors_launch_the_table_pick_untimed(tmp_path):
    """The interpreter's timings mean nothing: on CPU (no GPU description given) nothing is timed."""
    timer = FakeTimer({CANDIDATES[0]: 3.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 2.0})
    pick = _autotune.choose("attn_fwd", "D=128,bf16", CANDIDATES, timer.run, torch.device("cpu"), timer=timer)
    assert pick == CANDIDATES[0] and timer.timed == [] and not list(tmp_path.iterdir())


@pytest.mark.parametrize("content", ["{not json", '{"key": {}, "winner": [32, 128, 4, 5]}',
                                     '{"winner": [1, 2, 3, 4]}', "[]"])
def test_corrupt_cache_file_is_ignored_with_a_warning(tmp_path, content):
    path = _autotune.cache_path(_autotune.cache_key(ENV, "attn_fwd", "D=128,bf16", CANDIDATES))
    path.write_text(content)
    timer = FakeTimer({CANDIDATES[0]: 3.0, CANDIDATES[1]: 2.0, CANDIDATES[2]: 1.0})
    with pytest.warns(RuntimeWarning, match="ignoring cache file"):
        assert _choose(timer) == CANDIDATES[2]
    assert timer.timed == list(CANDIDATES)
    assert json.loads(path.read_text())["winner"] == list(CANDIDATES[2])  # replaced by a valid one


def test_cached_winner_outside_the_tuning_set_is_ignored(tmp_path):
    """A tuning set that lost a config retunes rather than launch a config CI no longer compiles."""
    key = _autotune.cache_key(ENV, "attn_fwd", "D=128,bf16", CANDIDATES)
    _autotune.write_winner(_autotune.cache_path(key), key, (8, 8, 1, 1), {})
    with pytest.warns(RuntimeWarning, match="not a candidate"):
        assert _choose(FakeTimer({CANDIDATES[0]: 1.0, CANDIDATES[1]: 2.0, CANDIDATES[2]: 3.0})) == CANDIDATES[0]


def test_spent_budget_and_graph_capture_launch_the_table_pick(monkeypatch):
    monkeypatch.setenv(_autotune.ENV_BUDGET, "0")
    timer = FakeTimer({CANDIDATES[0]: 3.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 2.0})
    assert _choose(timer) == CANDIDATES[0] and timer.timed == []
    monkeypatch.delenv(_autotune.ENV_BUDGET)
    monkeypatch.setattr(_autotune, "host_sync_forbidden", lambda: True)
    assert _choose(timer) == CANDIDATES[0] and timer.timed == []
    monkeypatch.setattr(_autotune, "host_sync_forbidden", lambda: False)
    assert _choose(timer) == CANDIDATES[1]
    monkeypatch.setattr(_autotune, "host_sync_forbidden", lambda: True)
    assert _choose(timer) == CANDIDATES[1]  # a winner known to the process is used during capture too


def test_a_cached_winner_is_used_when_no_timing_is_allowed(monkeypatch):
    """Budget spent or graph capture: nothing is timed, but a winner cached by an earlier process is read."""
    _choose(FakeTimer({CANDIDATES[0]: 3.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 2.0}))
    _autotune.reset()
    monkeypatch.setenv(_autotune.ENV_BUDGET, "0")
    monkeypatch.setattr(_autotune, "host_sync_forbidden", lambda: True)
    timer = FakeTimer({c: 1.0 for c in CANDIDATES})
    assert _choose(timer) == CANDIDATES[1] and timer.timed == []


def test_a_config_that_cannot_launch_is_skipped_but_the_table_pick_must_launch(capsys):
    from triton.runtime.errors import OutOfResources

    class Failing(FakeTimer):
        def __call__(self, fn):
            fn()
            if self.launched[-1] in self.fail:
                raise OutOfResources(300000, 232448, "shared memory")
            return super().__call__(lambda: None)

    timer = Failing({CANDIDATES[0]: 3.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 2.0})
    timer.fail = {CANDIDATES[1]}
    assert _choose(timer) == CANDIDATES[2]
    assert "skipping [32, 128, 4, 5]" in capsys.readouterr().err
    timer.fail = {CANDIDATES[0]}
    with pytest.raises(OutOfResources):
        _choose(timer, regime="D=64,bf16")


def test_configs_of_nested_tiles_round_trip_through_the_cache():
    """A reduce backward's candidate is a (dx pass, dw pass) pair of tiles: JSON turns it into lists, and
    the winner read back must still be the candidate object itself."""
    pairs = (((64, 128, 32, 8, 3), (64, 64, 32, 8, 3)), ((128, 128, 32, 4, 4), (128, 128, 32, 4, 4)))
    timer = FakeTimer({pairs[0]: 2.0, pairs[1]: 1.0})
    assert _choose(timer, candidates=pairs) is pairs[1]
    _autotune.reset()
    later = FakeTimer({p: 1.0 for p in pairs})
    assert _choose(later, candidates=pairs) is pairs[1] and later.timed == []
