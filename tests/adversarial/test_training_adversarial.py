"""Training under faults: a full disk during a checkpoint, a log torn by a crash, non-finite losses and
gradients at once and after queued steps, resuming a finished run. Work already saved is never lost,
and every failure says what happened and where the last good checkpoint is."""
import copy
import errno
import os

import pytest
import torch
from helpers import ToneDataset, model_config, train_config

from collat.model import CoLLAT
from collat.train import NonFiniteLossError, run
from collat.train.checkpoint import CHECKPOINT_DIR, find_checkpoint
from collat.train.runlog import LOG_NAME, read_log
from collat.train.state_io import read_trainer_state

pytestmark = [pytest.mark.adversarial, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def template():
    torch.manual_seed(0)
    return CoLLAT(model_config())


def train(template, out, model=None, **overrides):
    return run(template.config, train_config(out, **overrides), train_dataset=ToneDataset(),
               model=model if model is not None else copy.deepcopy(template))


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(template, tmp_path, monkeypatch):
    from collat.train import state_io

    original, calls = state_io.atomic_write, {"n": 0}

    def full_on_second_save(path, write):
        if str(path).endswith("trainer_state.safetensors"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, write)

    monkeypatch.setattr(state_io, "atomic_write", full_on_second_save)
    with pytest.raises(OSError, match="No space left"):
        train(template, tmp_path)
    monkeypatch.undo()
    assert read_trainer_state(find_checkpoint(str(tmp_path)))["step"] == 2
    assert train(template, tmp_path, resume=True)["step"] == 4  # and the run goes on once there is room


def test_the_command_line_reports_a_full_disk_with_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    from collat.train import __main__ as cli
    from collat.train import checkpoint

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_trainer_state", no_space)
    code = cli.main(["--out", str(tmp_path), "--steps", "2", "--batch-size", "4", "--train-size", "8", "--no-eval",
                     "--audio-size", "micro", "--depth", "1", "--clip-seconds", "0.5", "--amp", "none",
                     "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err and "the last complete checkpoint is none" in err
    assert "Traceback" not in err


def test_a_log_torn_by_a_crash_is_cut_back_on_resume(template, tmp_path):
    train(template, tmp_path, stop_at_step=2)
    with open(tmp_path / LOG_NAME, "a") as handle:
        handle.write('{"step": 2, "loss": 0.5, "l_c')  # the crash hit mid-line
    assert train(template, tmp_path, resume=True)["step"] == 4
    assert [r["step"] for r in read_log(str(tmp_path / LOG_NAME))] == [0, 1, 2, 3]


def test_a_non_finite_loss_at_the_first_step(template, tmp_path, monkeypatch):
    original = CoLLAT.compute_losses

    def nan_loss(self, wave, texts, spec_masks=None):
        out = original(self, wave, texts, spec_masks)
        out["loss"] = out["loss"] + float("inf")
        return out

    monkeypatch.setattr(CoLLAT, "compute_losses", nan_loss)
    with pytest.raises(NonFiniteLossError, match=r"step 0: loss=inf.*none \(none was written yet\)"):
        train(template, tmp_path)
    assert find_checkpoint(str(tmp_path)) is None and read_log(str(tmp_path / LOG_NAME)) == []


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped_and_named(template, tmp_path, monkeypatch):
    original, calls = torch.nn.utils.clip_grad_norm_, {"n": 0}

    def inf_grad_at_step_2(parameters, *args, **kwargs):
        parameters = list(parameters)
        calls["n"] += 1
        if calls["n"] == 3:
            parameters[0].grad.view(-1)[0] = float("inf")
        return original(parameters, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", inf_grad_at_step_2)
    model = copy.deepcopy(template)
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient at step 2: .*grad_norm=inf.*last good "
                                                 r"checkpoint is .*checkpoint"):
        train(template, tmp_path, model=model, log_every=2, save_every=2)
    assert read_trainer_state(find_checkpoint(str(tmp_path)))["step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the update of step 2 never happened


def test_resuming_a_finished_run_trains_nothing_and_keeps_everything(template, tmp_path):
    train(template, tmp_path)
    before = (tmp_path / LOG_NAME).read_text()
    result = train(template, tmp_path, resume=True)
    assert result["status"] == "completed" and result["step"] == 4
    assert (tmp_path / LOG_NAME).read_text() == before
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(CHECKPOINT_DIR)) == [CHECKPOINT_DIR]
