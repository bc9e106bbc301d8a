"""Crashes at every point of a checkpoint save, once and twice in a row, and planted pickles wherever
a checkpoint or run file is read.

A crash is modelled by the state of the disk at that instant: before every file-system operation of a
save (each rename, each file or folder removed, including every file inside a folder being deleted,
each folder made) the run folder is copied. Each copy is what a SIGKILL there would leave; resuming
from it must find a complete checkpoint, never an older one than a crash earlier could have left.
"""
import dataclasses
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from collat.config import CoLLATConfig, TrainConfig
from collat.fileio import atomic_write, atomic_write_text
from collat.model.pretrained import (
    ARCHITECTURE,
    CONFIG_NAME,
    WEIGHTS_NAME,
    PretrainedMixin,
)
from collat.train.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_folders,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from collat.train.optim import build_optimizer
from collat.train.state_io import (
    LEGACY_STATE,
    STATE_JSON,
    STATE_TENSORS,
    TrainerStateError,
    read_trainer_state,
    write_trainer_state,
)

pytestmark = pytest.mark.adversarial


class Tiny(nn.Module):
    """A few weights saved and loaded like a CoLLAT (config.json + model.safetensors, format version 1, which
    needs no encoders), cheap to save hundreds of times."""

    read_config = PretrainedMixin.read_config
    load_weights = PretrainedMixin.load_weights

    def __init__(self, config=None):
        super().__init__()
        self.config = config or CoLLATConfig()
        self.layer = nn.Linear(3, 2)
        self.logit_scale = nn.Parameter(torch.tensor(1.0))

    @property
    def device(self):
        return self.layer.weight.device

    def save_pretrained(self, directory):
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda path: save_file(state, path))
        payload = {"architecture": ARCHITECTURE, "format_version": 1, "config": dataclasses.asdict(self.config)}
        atomic_write_text(os.path.join(directory, CONFIG_NAME), json.dumps(payload))


def trainer(seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    optimizer, scheduler = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler):
    loss = model.layer(torch.ones(1, 3)).square().sum() * model.logit_scale
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


class CrashPoints:
    """Copies the run folder before every file-system operation (the state a kill there would leave)."""

    OPERATIONS = ("replace", "rename", "remove", "unlink", "rmdir", "mkdir")

    def __init__(self, monkeypatch, out, snapshots):
        self.out, self.snapshots, self.busy, self.count = str(out), str(snapshots), False, 0
        for name in self.OPERATIONS:
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, operation):
        def run(*args, **kwargs):
            if not self.busy:
                self.busy = True
                try:
                    shutil.copytree(self.out, os.path.join(self.snapshots, f"{self.count:03d}"), symlinks=True)
                    self.count += 1
                finally:
                    self.busy = False
            return operation(*args, **kwargs)

        return run


def crash_states(monkeypatch, out, snapshots, save):
    """Every folder state a crash during `save()` could leave, plus the state after it finished."""
    with monkeypatch.context() as patch:
        CrashPoints(patch, out, snapshots)
        save()
    states = sorted(os.path.join(snapshots, name) for name in os.listdir(snapshots))
    return states + [str(out)]


def step_found(folder):
    path = find_checkpoint(folder)
    assert path is not None, f"no complete checkpoint in {folder}: {sorted(os.listdir(folder))}"
    state = read_trainer_state(path)
    model, optimizer, scheduler = trainer(seed=1)
    assert load_checkpoint(path, model, optimizer, scheduler, train_config=TrainConfig()) == state["step"]
    return state["step"], model


def test_a_crash_anywhere_in_a_save_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    model, optimizer, scheduler = trainer()
    train_step(model, optimizer, scheduler)
    save_checkpoint(str(out), model, optimizer, scheduler, 2, TrainConfig())
    saved_at_2 = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, optimizer, scheduler)
    states = crash_states(monkeypatch, out, tmp_path / "crash",
                          lambda: save_checkpoint(str(out), model, optimizer, scheduler, 4, TrainConfig()))
    assert len(states) >= 15  # every rename, every removal, the folders made
    steps = []
    for state in states:
        step, loaded = step_found(state)
        expected = saved_at_2 if step == 2 else model.state_dict()
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, expected[key]), (state, key)
        steps.append(step)
    assert set(steps) == {2, 4} and steps[-1] == 4
    assert steps == sorted(steps)  # once the new one is complete somewhere, it is what resume finds
    assert sorted(os.listdir(out)) == [CHECKPOINT_DIR]


def test_two_crashes_in_a_row_never_lose_the_newest_checkpoint(tmp_path, monkeypatch):
    """Crash once anywhere in the save of step 4, resume from what is left, crash again anywhere in the
    save of step 6: resume finds a complete checkpoint at least as new as after the first crash."""
    base = tmp_path / "run"
    model, optimizer, scheduler = trainer()
    save_checkpoint(str(base), model, optimizer, scheduler, 2, TrainConfig())
    firsts = crash_states(monkeypatch, base, tmp_path / "first",
                          lambda: save_checkpoint(str(base), model, optimizer, scheduler, 4, TrainConfig()))
    checked = 0
    for k, first in enumerate(firsts[:-1]):
        step, _ = step_found(first)
        resumed, optimizer2, scheduler2 = trainer(seed=2)
        load_checkpoint(find_checkpoint(first), resumed, optimizer2, scheduler2, train_config=TrainConfig())
        seconds = crash_states(monkeypatch, first, tmp_path / f"second-{k}",
                               lambda f=first, m=resumed, o=optimizer2, s=scheduler2, n=step + 2:
                               save_checkpoint(f, m, o, s, n, TrainConfig()))
        for second in seconds:
            again, _ = step_found(second)
            assert again >= step, (first, second, step, again)
            checked += 1
        assert step_found(seconds[-1])[0] == step + 2
        leftovers = [name for name in os.listdir(first) if name.startswith(CHECKPOINT_DIR)]
        assert leftovers == [CHECKPOINT_DIR], leftovers
    assert checked > 100


def test_incomplete_folders_are_never_chosen(tmp_path):
    out = str(tmp_path)
    model, optimizer, scheduler = trainer()
    save_checkpoint(out, model, optimizer, scheduler, 2, TrainConfig())
    folders = checkpoint_folders(out)
    shutil.copytree(folders["final"], folders["tmp"])
    state = read_trainer_state(folders["tmp"])
    write_trainer_state(folders["tmp"], {**state, "step": 9})
    for missing in ("config.json", "model.safetensors", STATE_TENSORS, STATE_JSON):
        os.rename(os.path.join(folders["tmp"], missing), os.path.join(tmp_path, "aside"))
        assert find_checkpoint(out) == folders["final"], missing
        os.rename(os.path.join(tmp_path, "aside"), os.path.join(folders["tmp"], missing))
    assert find_checkpoint(out) == folders["tmp"]  # complete and newer
    with open(os.path.join(folders["tmp"], STATE_JSON), "w") as handle:
        handle.write('{"state": {"step": "nine"')  # torn
    assert find_checkpoint(out) == folders["final"]


# ------------------------------------------------------------------------------------------ planted pickles
class Planted:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("target", [STATE_TENSORS, STATE_JSON, "model.safetensors", "config.json", LEGACY_STATE])
def test_a_pickle_planted_in_any_checkpoint_file_never_runs(tmp_path, target):
    out = str(tmp_path / "run")
    model, optimizer, scheduler = trainer()
    save_checkpoint(out, model, optimizer, scheduler, 2, TrainConfig())
    marker = tmp_path / "pwned"
    path = os.path.join(out, CHECKPOINT_DIR, target)
    if target == LEGACY_STATE:  # an older collat's layout: the pickle is all there is
        for name in (STATE_TENSORS, STATE_JSON):
            os.remove(os.path.join(out, CHECKPOINT_DIR, name))
        torch.save({"step": 2, "optimizer": Planted(marker)}, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump({"step": 2, "x": Planted(marker)}, handle)
    fresh, optimizer2, scheduler2 = trainer()
    found = find_checkpoint(out)
    if found is not None:
        with pytest.raises((TrainerStateError, ValueError)) as info:
            load_checkpoint(found, fresh, optimizer2, scheduler2, train_config=TrainConfig())
        assert target in str(info.value) or CHECKPOINT_DIR in str(info.value)
    assert not marker.exists()


def test_a_planted_clip_text_checkpoint_never_runs(tmp_path):
    from collat.model.text import _clip_text_state

    marker = tmp_path / "pwned"
    path = tmp_path / "open_clip_model.pt"
    torch.save({"state_dict": {"x": Planted(marker)}}, path)
    with pytest.raises(Exception) as info:
        _clip_text_state(str(path))
    assert "Weights only load failed" in str(info.value) or "Unsupported global" in str(info.value)
    assert not marker.exists()
