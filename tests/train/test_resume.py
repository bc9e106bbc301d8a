"""Resuming a run (issue 17 items 4, 7, 8): changed options, trainer state that cannot run code, crashes
inside a checkpoint save, and logs that are never deleted."""
import copy
import dataclasses
import math
import os
import pickle
import shutil

import pytest
import torch
from helpers import ToneDataset, model_config, train_config

from collat.model import CoLLAT
from collat.train import run
from collat.train.checkpoint import CHECKPOINT_DIR, find_checkpoint, rng_state
from collat.train.optim import build_optimizer
from collat.train.runlog import LOG_NAME, read_log
from collat.train.state_io import (
    LEGACY_STATE,
    STATE_JSON,
    STATE_TENSORS,
    TrainerStateError,
    read_trainer_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def template():
    torch.manual_seed(0)
    return CoLLAT(model_config())


def train(template, out, **overrides):
    return run(template.config, train_config(out, **overrides), train_dataset=ToneDataset(),
               model=copy.deepcopy(template))


def cosine_lr(peak, step, warmup=1, steps=4):
    """The schedule written out independently of collat.train.optim: warmup, then cosine to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min((step - warmup) / (steps - warmup), 1.0)))


# ------------------------------------------------------------------------------------------ item 4
def test_resume_with_a_new_lr_applies_it_from_the_resumed_step(template, tmp_path, capsys):
    train(template, tmp_path, stop_at_step=2)
    train(template, tmp_path, resume=True, lr=0.1)
    rows = read_log(str(tmp_path / LOG_NAME))
    # A row's lr is the one the next step uses (the scheduler has stepped): steps 0-1 on 1e-3, then 0.1.
    assert [r["lr"] for r in rows] == pytest.approx([cosine_lr(1e-3, 1), cosine_lr(1e-3, 2), cosine_lr(0.1, 3),
                                                     cosine_lr(0.1, 4)])
    assert "lr 0.001 -> 0.1; applied from step 2 on" in capsys.readouterr().err
    state = read_trainer_state(str(tmp_path / CHECKPOINT_DIR))
    assert state["train_config"]["lr"] == 0.1 and state["scheduler"]["base_lrs"] == [0.1, 0.1]


def test_resume_with_another_batch_size_or_seed_is_refused(template, tmp_path):
    train(template, tmp_path, stop_at_step=2)
    with pytest.raises(ValueError, match=r"--batch-size 4 -> 2 changed since the checkpoint"):
        train(template, tmp_path, resume=True, batch_size=2)
    with pytest.raises(ValueError, match=r"--seed 0 -> 1"):
        train(template, tmp_path, resume=True, seed=1)
    assert [r["step"] for r in read_log(str(tmp_path / LOG_NAME))] == [0, 1]  # nothing was touched


# ------------------------------------------------------------------------------------------ item 7
class Planted:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_never_unpickles_a_planted_file(template, tmp_path):
    train(template, tmp_path, stop_at_step=2)
    checkpoint = tmp_path / CHECKPOINT_DIR
    assert sorted(os.listdir(checkpoint)) == sorted(["README.md", "config.json", "model.safetensors", "tokenizer",
                                                    STATE_TENSORS, STATE_JSON])
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"step": 2, "x": Planted(str(marker))})
    # 1. A pickle in place of the tensors file.
    (checkpoint / STATE_TENSORS).write_bytes(payload)
    with pytest.raises(TrainerStateError, match="trainer_state.safetensors is not a readable safetensors file"):
        train(template, tmp_path, resume=True)
    # 2. An older collat's trainer_state.pt that is a crafted pickle.
    os.remove(checkpoint / STATE_TENSORS)
    os.remove(checkpoint / STATE_JSON)
    for write in (lambda path: path.write_bytes(payload),  # a bare pickle, and torch.save's zip format
                  lambda path: torch.save({"step": 2, "x": Planted(str(marker))}, path)):
        write(checkpoint / LEGACY_STATE)
        with pytest.raises(TrainerStateError, match="cannot be read safely"):
            train(template, tmp_path, resume=True)
    assert not marker.exists()


def test_an_older_collats_trainer_state_resumes_safely(template, tmp_path):
    """A trainer_state.pt as collat wrote it before (tensors, tuples, NumPy RNG state) loads with
    weights_only=True: the run continues where it stopped."""
    train(template, tmp_path / "full")
    train(template, tmp_path / "part", stop_at_step=2)
    checkpoint = tmp_path / "part" / CHECKPOINT_DIR
    state = read_trainer_state(str(checkpoint))
    os.remove(checkpoint / STATE_TENSORS)
    os.remove(checkpoint / STATE_JSON)
    torch.save(state, checkpoint / LEGACY_STATE)
    resumed = train(template, tmp_path / "part", resume=True)
    assert resumed["step"] == 4
    full, part = (read_log(str(tmp_path / name / LOG_NAME)) for name in ("full", "part"))
    assert [r["loss"] for r in part] == [r["loss"] for r in full]


def test_trainer_state_round_trips_bit_exactly(template, tmp_path):
    from collat.train.state_io import write_trainer_state

    model = copy.deepcopy(template)
    optimizer, scheduler = build_optimizer(model, train_config(tmp_path), torch.device("cpu"))
    for p in model.trainable_parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    scheduler.step()
    state = {"step": 7, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
             "rng_per_rank": [rng_state(), rng_state()], "odd": {1: (float("inf"), None, [2.5e-300])}}
    write_trainer_state(str(tmp_path), state)
    back = read_trainer_state(str(tmp_path))
    assert back["step"] == 7 and back["odd"] == {1: (float("inf"), None, [2.5e-300])}
    assert back["rng"]["python"] == state["rng"]["python"]
    assert back["rng"]["numpy"][0] == "MT19937" and (back["rng"]["numpy"][1] == state["rng"]["numpy"][1]).all()
    assert back["rng"]["numpy"][1].dtype == state["rng"]["numpy"][1].dtype
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert back["scheduler"] == state["scheduler"]
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for index, entry in state["optimizer"]["state"].items():
        for key, value in entry.items():
            assert torch.equal(back["optimizer"]["state"][index][key], value), (index, key)


# ------------------------------------------------------------------------------------------ item 8
def test_two_crashes_inside_saves_still_resume_from_the_newest_checkpoint(template, tmp_path, monkeypatch):
    """Issue 17 item 8: crash 1 after the old checkpoint was moved aside (the save of step 4), crash 2 in
    the next save (step 6) before its folder was renamed into place. Before the fix only checkpoint.tmp
    was left whole, and --resume restarted at 0 and deleted log.jsonl."""
    train(template, tmp_path, steps=8, stop_at_step=2)  # checkpoint at step 2
    real_replace = os.replace

    def crash_at_rename_into_place(number):
        """os.replace that kills the run at the `number`-th rename of checkpoint.tmp to checkpoint."""
        seen = {"n": 0}

        def replace(src, dst):
            if str(src).endswith(CHECKPOINT_DIR + ".tmp") and str(dst).endswith(CHECKPOINT_DIR):
                seen["n"] += 1
                if seen["n"] == number:
                    raise KeyboardInterrupt("simulated crash before the new checkpoint is renamed into place")
            return real_replace(src, dst)

        return replace

    monkeypatch.setattr(os, "replace", crash_at_rename_into_place(1))
    with pytest.raises(KeyboardInterrupt):
        train(template, tmp_path, steps=8, resume=True, stop_at_step=4)
    assert os.path.isdir(tmp_path / (CHECKPOINT_DIR + ".old")) and not os.path.isdir(tmp_path / CHECKPOINT_DIR)
    assert find_checkpoint(str(tmp_path)).endswith(".tmp")  # the step-4 folder, complete
    # The next save first puts the step-4 folder in place (rename 1), then dies before its own (rename 2).
    monkeypatch.setattr(os, "replace", crash_at_rename_into_place(2))
    with pytest.raises(KeyboardInterrupt):
        train(template, tmp_path, steps=8, resume=True, stop_at_step=6)
    monkeypatch.setattr(os, "replace", real_replace)
    newest = find_checkpoint(str(tmp_path))
    assert read_trainer_state(newest)["step"] == 6
    result = train(template, tmp_path, steps=8, resume=True)
    assert result["step"] == 8
    assert [r["step"] for r in read_log(str(tmp_path / LOG_NAME))] == list(range(8))
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(CHECKPOINT_DIR)) == [CHECKPOINT_DIR]
    uninterrupted = train(template, tmp_path / "straight", steps=8)
    assert uninterrupted["step"] == 8
    assert [r["loss"] for r in read_log(str(tmp_path / LOG_NAME))] == \
        [r["loss"] for r in read_log(str(tmp_path / "straight" / LOG_NAME))]


def test_no_checkpoint_never_deletes_the_log(template, tmp_path, capsys):
    train(template, tmp_path, stop_at_step=2)
    shutil.rmtree(tmp_path / CHECKPOINT_DIR)
    before = (tmp_path / LOG_NAME).read_text()
    train(template, tmp_path, resume=True)
    assert "no complete checkpoint" in capsys.readouterr().err
    assert (tmp_path / (LOG_NAME + ".1")).read_text() == before
    train(template, tmp_path)  # a fresh run in the same folder keeps the previous log too
    assert (tmp_path / (LOG_NAME + ".2")).is_file()
    assert [r["step"] for r in read_log(str(tmp_path / LOG_NAME))] == [0, 1, 2, 3]


def test_resume_from_a_folder_with_a_changed_model_is_refused(template, tmp_path):
    train(template, tmp_path, stop_at_step=2)
    other = CoLLAT(dataclasses.replace(model_config(), interaction_depth=2))
    with pytest.raises(ValueError, match="another model config"):
        run(other.config, train_config(tmp_path, resume=True), train_dataset=ToneDataset(), model=other)
