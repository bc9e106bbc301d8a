"""Logging without host syncs (log_every), TensorBoard, evaluation during training, and the command line's
options and values (issue 18 item 2; issue 20 item 3; issue 17 items 6 and 15)."""
import copy
import dataclasses
import glob
import json
import math
import os

import pytest
import torch
from helpers import ToneDataset, model_config, train_config

from collat.config import CoLLATConfig, ConfigError, TrainConfig
from collat.model import CoLLAT
from collat.train import NonFiniteLossError, run
from collat.train import loop as loop_module
from collat.train.__main__ import build_parser, main, parse_args
from collat.train.checkpoint import CHECKPOINT_DIR, find_checkpoint
from collat.train.runlog import LOG_NAME, TENSORBOARD_DIR, read_log

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def template():
    torch.manual_seed(0)
    return CoLLAT(model_config())


def train(template, out, eval_sets=None, **overrides):
    return run(template.config, train_config(out, **overrides), train_dataset=ToneDataset(), eval_sets=eval_sets,
               model=copy.deepcopy(template))


class HostReads:
    """Counts the host reads of tensor values (item, tolist, float, bool) made by collat/train/loop.py."""

    METHODS = ("item", "tolist", "__float__", "__bool__", "__int__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def read(tensor, *args, **kwargs):
            import sys

            if sys._getframe(1).f_code.co_filename == loop_module.__file__:
                self.count += 1
            return original(tensor, *args, **kwargs)

        return read


def test_steps_read_the_device_once_per_log_every(template, tmp_path, monkeypatch):
    every = train(template, tmp_path / "every")
    reads = HostReads(monkeypatch)
    result = train(template, tmp_path / "batched", steps=4, log_every=4, save_every=4)
    assert result["status"] == "completed" and reads.count == 1  # one read for 4 steps (was 2 + 5 per step)
    monkeypatch.undo()
    batched = read_log(str(tmp_path / "batched" / LOG_NAME))
    assert [r["step"] for r in batched] == [0, 1, 2, 3]  # still one row per step
    keys = ("loss", "l_ct", "l_cg", "l_ut", "logit_scale", "grad_norm", "lr")
    assert [[r[k] for k in keys] for r in batched] == [[r[k] for k in keys] for r in read_log(str(tmp_path / "every" / LOG_NAME))]
    assert every["step"] == 4


def test_a_non_finite_step_never_reaches_the_weights(template, tmp_path, monkeypatch):
    """With log_every=4 the NaN of step 1 is read after step 3: its update was skipped on the device
    (found_inf), steps 2-3 trained on sound weights, and no checkpoint holds anything after it."""
    calls = {"n": 0}
    original = CoLLAT.compute_losses

    def nan_at_step_1(self, wave, texts, spec_masks=None):
        out = original(self, wave, texts, spec_masks)
        calls["n"] += 1
        if calls["n"] == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(CoLLAT, "compute_losses", nan_at_step_1)
    model = copy.deepcopy(template)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 1: loss=nan.*update was skipped.*"
                                                 r"last good checkpoint is none"):
        run(model.config, train_config(tmp_path, log_every=4, save_every=4), train_dataset=ToneDataset(), model=model)
    assert calls["n"] == 4 and find_checkpoint(str(tmp_path)) is None
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["step"] for r in read_log(str(tmp_path / LOG_NAME))] == [0]


def test_tensorboard_and_evaluation_during_training(template, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    eval_sets = {"seen top-1": ToneDataset(4, seed=1)}
    result = train(template, tmp_path, eval_sets=eval_sets, report_to="tensorboard", eval_every=2, evaluate=True)
    assert result["status"] == "completed"
    evals = read_log(str(tmp_path / LOG_NAME), kind="eval")
    assert [row["step"] for row in evals] == [1]  # after 2 of 4 steps; the end has its own table
    assert set(evals[0]["eval"]) == {"seen top-1", "seen top-1 noisy"}
    files = glob.glob(str(tmp_path / TENSORBOARD_DIR / "events.out.tfevents.*"))
    assert files
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/l_ct", "train/grad_norm", "train/lr", "eval/seen top-1"} <= set(tags)
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    logged = [(r["step"], r["loss"]) for r in read_log(str(tmp_path / LOG_NAME))]
    assert [s for s, _ in losses] == [0, 1, 2, 3]
    assert [v for _, v in losses] == pytest.approx([v for _, v in logged], rel=1e-6)
    assert events.Scalars("eval/seen top-1")[0].value == pytest.approx(evals[0]["eval"]["seen top-1"])


def test_shard_training_evaluates_on_an_eval_manifest(tmp_path, capsys):
    import numpy as np
    import soundfile

    from collat.data.manifest import ManifestEntry, write_manifest
    from collat.data.shards import write_shards

    entries = []
    for k in range(6):
        path = str(tmp_path / "audio" / f"{k}.wav")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        soundfile.write(path, 0.3 * np.sin(np.arange(8000) * 0.05 * (k % 2 + 1)), 16000, subtype="PCM_16")
        entries.append(ManifestEntry(path, [["dog", "bell"][k % 2]], split="train" if k < 4 else "test"))
    manifest = write_manifest(entries, str(tmp_path / "m.csv"))
    write_shards(manifest, str(tmp_path / "shards"), split="train", samples_per_shard=2)
    args = ["--train-shards", str(tmp_path / "shards"), "--steps", "1",
            "--batch-size", "2", "--audio-size", "micro", "--clip-seconds", "0.5", "--depth", "1", "--amp", "none",
            "--device", "cpu", "--no-progress", "--eval-size", "2"]
    result = run(*parse_args([*args, "--out", str(tmp_path / "run"), "--eval-manifest", manifest]))
    assert set(result["trained"]) == {"test top-1", "test top-1 noisy"}
    result = run(*parse_args([*args, "--out", str(tmp_path / "bare")]))
    assert "trained" not in result and "evaluates nothing unless --eval-manifest" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the command line
def test_help_names_every_config_field():
    text = build_parser((CoLLATConfig(), TrainConfig())).format_help()
    for cls in (CoLLATConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            assert f"--{f.name.replace('_', '-')}" in text, f.name


def test_yaml_config_round_trips(tmp_path):
    yaml = pytest.importorskip("yaml")
    model = dataclasses.replace(CoLLATConfig(), interaction_depth=3, lambda_cg=0.5, context_length=32)
    train_cfg = dataclasses.replace(TrainConfig(), steps=7, lr=2e-4, eval_manifest="m.csv", stop_at_step=5)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": dataclasses.asdict(model), "train": dataclasses.asdict(train_cfg)}))
    assert parse_args(["--config", str(path)]) == (model, train_cfg)
    # ... and the command line still wins over the file.
    assert parse_args(["--config", str(path), "--steps", "9"])[1].steps == 9
    path.write_text("train:\n  steps: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(SystemExit):  # safe_load builds plain values only
        parse_args(["--config", str(path)])


@pytest.mark.parametrize("argv, message", [
    (["--steps", "-3"], "argument --steps: must be >= 1, got -3"),
    (["--save-every", "0"], "argument --save-every: must be >= 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--lr", "nan"], "argument --lr: must be a finite number"),
    (["--clip-seconds", "1e6"], "argument --clip-seconds: must be > 0.2 and <= 60"),
    (["--log-every", "0"], "argument --log-every: must be >= 1"),
    (["--grad-clip", "0"], "argument --grad-clip: must be > 0"),
    (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
])
def test_nonsense_values_are_refused_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("payload, message", [
    ({"train": {"steps": "ten"}}, "train.steps must be an int, got 'ten' (str)"),
    ({"train": {"save_every": 0}}, "train.save_every must be >= 1, got 0"),
    ({"model": {"clip_seconds": 1e6}}, "model.clip_seconds must be > 0.2 and <= 60"),
    ({"model": {"interaction_depth": 2.5}}, "model.interaction_depth must be an int"),
    ({"train": [1, 2]}, "'train' must be an object"),
    ([1, 2], "must hold an object"),
])
def test_nonsense_config_files_are_refused_naming_the_file(payload, message, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(SystemExit) as info:
        parse_args(["--config", str(path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and str(path) in err


def test_the_python_api_validates_too(template, tmp_path):
    with pytest.raises(ConfigError, match="steps must be >= 1, got -3"):
        train(template, tmp_path, steps=-3)
    assert not os.path.exists(tmp_path / LOG_NAME) and not os.path.exists(tmp_path / CHECKPOINT_DIR)
    with pytest.raises(ConfigError, match="clip_seconds"):
        CoLLAT(dataclasses.replace(model_config(), clip_seconds=1e6))
    assert math.isfinite(TrainConfig().lr)
