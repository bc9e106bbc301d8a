"""The training loop: logging, checkpoints, bit-exact resume, signals, non-finite loss, evaluation, CLI."""
import copy
import json
import os
import signal

import pytest
import torch
from helpers import ToneDataset, model_config, train_config

from collat.config import load_preset
from collat.evaluate.quick import format_table
from collat.model import CoLLAT
from collat.train import NonFiniteLossError, run
from collat.train.__main__ import main, parse_args
from collat.train.batching import epoch_batches
from collat.train.checkpoint import CHECKPOINT_DIR
from collat.train.distributed import World
from collat.train.loop import RESULTS_NAME
from collat.train.runlog import LOG_NAME, PLOT_NAME, read_log
from collat.train.state_io import read_trainer_state

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def template():
    torch.manual_seed(0)
    return CoLLAT(model_config())


def train(template, out, dataset=None, eval_sets=None, **overrides):
    return run(template.config, train_config(out, **overrides), train_dataset=dataset or ToneDataset(),
               eval_sets=eval_sets, model=copy.deepcopy(template))


def losses(out):
    return [(r["step"], r["loss"], r["l_ct"], r["l_cg"], r["l_ut"]) for r in read_log(os.path.join(out, LOG_NAME))]


def test_resume_is_bit_exact(template, tmp_path):
    full = train(template, tmp_path / "full")
    assert full["status"] == "completed" and full["step"] == 4
    part = train(template, tmp_path / "part", stop_at_step=2)
    assert part["status"] == "stopped" and part["step"] == 2
    resumed = train(template, tmp_path / "part", resume=True)
    assert resumed["status"] == "completed" and resumed["step"] == 4
    assert [row[0] for row in losses(tmp_path / "part")] == [0, 1, 2, 3]
    assert losses(tmp_path / "part") == losses(tmp_path / "full")  # exactly the same floats
    a = CoLLAT.from_pretrained(str(tmp_path / "full" / CHECKPOINT_DIR))
    b = CoLLAT.from_pretrained(str(tmp_path / "part" / CHECKPOINT_DIR))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    for k, v in template.locked_text_state().items():  # the locked text encoder never moved
        assert torch.equal(v, a.text.state_dict()[k]), k
    assert os.path.isfile(tmp_path / "full" / PLOT_NAME)


def test_signal_saves_checkpoint_and_stops(template, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = CoLLAT.compute_losses

    def compute_then_signal(self, wave, texts, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step; the step finishes, then it stops
        return original(self, wave, texts, *args, **kwargs)

    monkeypatch.setattr(CoLLAT, "compute_losses", compute_then_signal)
    result = train(template, tmp_path, save_every=100)
    assert result["status"] == "interrupted by SIGTERM" and result["step"] == 2
    state = read_trainer_state(str(tmp_path / CHECKPOINT_DIR))
    assert state["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


def test_non_finite_loss_stops_and_keeps_last_checkpoint(template, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = CoLLAT.compute_losses

    def nan_at_step_3(self, wave, texts, *args, **kwargs):
        out = original(self, wave, texts, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(CoLLAT, "compute_losses", nan_at_step_3)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3.*last good checkpoint"):
        train(template, tmp_path, save_every=2)
    state = read_trainer_state(str(tmp_path / CHECKPOINT_DIR))
    assert state["step"] == 2
    CoLLAT.from_pretrained(str(tmp_path / CHECKPOINT_DIR))  # still a whole, loadable checkpoint


def test_end_to_end_with_evaluation(template, tmp_path):
    eval_sets = {"seen top-1": ToneDataset(8, seed=1), "mixture mAP": ToneDataset(8, seed=2, multi=True)}
    result = train(template, tmp_path, eval_sets=eval_sets, steps=2, evaluate=True)
    for table in (result["untrained"], result["trained"]):
        assert set(table) == {"seen top-1", "seen top-1 noisy", "mixture mAP", "mixture mAP noisy"}
        assert all(0.0 <= v <= 1.0 for v in table.values())
    saved = json.loads((tmp_path / RESULTS_NAME).read_text())
    assert saved["trained"] == result["trained"] and saved["model_config"]["audio_size"] == "micro"
    rows = read_log(str(tmp_path / LOG_NAME))
    assert [r["step"] for r in rows] == [0, 1]
    assert {"loss", "l_ct", "l_cg", "l_ut", "logit_scale", "lr", "grad_norm", "samples_per_s"} <= set(rows[0])
    assert "untrained" in format_table(result["untrained"], result["trained"], {"seen top-1": 0.25})


def test_missing_soundfont_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("COLLAT_SOUNDFONT", str(tmp_path / "none.sf2"))
    with pytest.raises(FileNotFoundError, match="soundfont not found"):
        run(model_config(), train_config(tmp_path))
    assert main(["--out", str(tmp_path), "--steps", "1", "--no-progress"]) == 1


def test_epoch_batches_shard_the_global_batch():
    one = epoch_batches(32, 8, World(0, 0, 1), seed=0, epoch=0)
    two = [epoch_batches(32, 8, World(r, r, 2), seed=0, epoch=0) for r in range(2)]
    for s in range(len(one)):
        assert sorted(two[0][s] + two[1][s]) == sorted(one[s])  # each step sees the same global batch
    assert epoch_batches(32, 8, World(), seed=0, epoch=1) != one


def test_cli_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"interaction_depth": 2, "lambda_cg": 0.5}, "train": {"steps": 7, "lr": 1e-3}}))
    model_cfg, train_cfg = parse_args(["--config", str(path), "--steps", "9", "--matching", "optimal", "--reference-ops"])
    assert model_cfg.interaction_depth == 2 and model_cfg.lambda_cg == 0.5 and model_cfg.matching == "optimal"
    assert not model_cfg.fused and train_cfg.steps == 9 and train_cfg.lr == 1e-3
    default_model, default_train = parse_args([])
    assert default_model == load_preset("cpu")[0] and default_model.lambda_cg == 1.0
    paper, _ = parse_args(["--preset", "paper"])
    assert (paper.lambda_ct, paper.lambda_cg, paper.lambda_ut, paper.noisy_fraction) == (1.0, 0.1, 0.01, 1.0)
    path.write_text(json.dumps({"model": {"no_such_knob": 1}}))
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path)])


def test_example_configs_parse():
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "collat", "configs")
    for name in sorted(n for n in os.listdir(root) if n.endswith(".json")):
        parse_args(["--config", os.path.join(root, name)])
