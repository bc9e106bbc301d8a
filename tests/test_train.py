"""The training loop: logging, checkpoints, bit-exact resume, signals, non-finite loss, evaluation, CLI."""
import copy
import json
import os
import signal

import pytest
import torch

from collat import train as T
from collat.model import CoLLAT, CoLLATConfig, make_prompt

SR = 16000
NAMES = ["violin", "flute", "drum", "bell"]


class ToneDataset(torch.utils.data.Dataset):
    """Each class is a pure tone; items are a deterministic function of the index (like SoundfontDataset)."""

    def __init__(self, size=16, seed=0, multi=False):
        self.size, self.seed, self.multi = size, seed, multi
        self.class_names = NAMES

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(self.seed * 100003 + index)
        k = int(torch.randint(2, 4, (1,), generator=g)) if self.multi else 1
        classes = torch.randperm(len(NAMES), generator=g)[:k].tolist()
        t = torch.arange(SR // 2) / SR
        wave = sum(torch.sin(2 * torch.pi * 220.0 * 2 ** c * t) for c in classes) * 0.3
        labels = torch.zeros(len(NAMES))
        labels[classes] = 1.0
        names = [NAMES[c] for c in classes]
        return {"wave": wave.float(), "labels": labels, "text": make_prompt(names), "names": names}


pytestmark = pytest.mark.usefixtures("one_thread")


def model_config():
    return CoLLATConfig(audio_size="micro", clip_seconds=0.5, interaction_depth=1, interaction_heads=6,
                        context_length=24, fused=False, lambda_cg=1.0, noisy_fraction=0.5)


@pytest.fixture(scope="module")
def template():
    torch.manual_seed(0)
    return CoLLAT(model_config())


def train_config(out, **overrides):
    values = dict(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, amp="none", device="cpu", out=str(out),
                  save_every=2, evaluate=False, progress=False)
    values.update(overrides)
    return T.TrainConfig(**values)


def run(template, out, dataset=None, eval_sets=None, **overrides):
    return T.run(template.config, train_config(out, **overrides), train_dataset=dataset or ToneDataset(),
                 eval_sets=eval_sets, model=copy.deepcopy(template))


def losses(out):
    return [(r["step"], r["loss"], r["l_ct"], r["l_cg"], r["l_ut"]) for r in T.read_log(os.path.join(out, T.LOG_NAME))]


def test_resume_is_bit_exact(template, tmp_path):
    full = run(template, tmp_path / "full")
    assert full["status"] == "completed" and full["step"] == 4
    part = run(template, tmp_path / "part", stop_at_step=2)
    assert part["status"] == "stopped" and part["step"] == 2
    resumed = run(template, tmp_path / "part", resume=True)
    assert resumed["status"] == "completed" and resumed["step"] == 4
    assert [row[0] for row in losses(tmp_path / "part")] == [0, 1, 2, 3]
    assert losses(tmp_path / "part") == losses(tmp_path / "full")  # exactly the same floats
    a = CoLLAT.from_pretrained(str(tmp_path / "full" / T.CHECKPOINT_DIR))
    b = CoLLAT.from_pretrained(str(tmp_path / "part" / T.CHECKPOINT_DIR))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    for k, v in template.locked_text_state().items():  # the locked text encoder never moved
        assert torch.equal(v, a.text.state_dict()[k]), k
    assert os.path.isfile(tmp_path / "full" / T.PLOT_NAME)


def test_signal_saves_checkpoint_and_stops(template, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = CoLLAT.compute_losses

    def compute_then_signal(self, wave, texts):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step; the step finishes, then it stops
        return original(self, wave, texts)

    monkeypatch.setattr(CoLLAT, "compute_losses", compute_then_signal)
    result = run(template, tmp_path, save_every=100)
    assert result["status"] == "interrupted by SIGTERM" and result["step"] == 2
    state = torch.load(tmp_path / T.CHECKPOINT_DIR / T.TRAINER_STATE, weights_only=False)
    assert state["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


def test_non_finite_loss_stops_and_keeps_last_checkpoint(template, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = CoLLAT.compute_losses

    def nan_at_step_3(self, wave, texts):
        out = original(self, wave, texts)
        calls["n"] += 1
        if calls["n"] == 4:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(CoLLAT, "compute_losses", nan_at_step_3)
    with pytest.raises(T.NonFiniteLossError, match="non-finite loss at step 3.*last good checkpoint"):
        run(template, tmp_path, save_every=2)
    state = torch.load(tmp_path / T.CHECKPOINT_DIR / T.TRAINER_STATE, weights_only=False)
    assert state["step"] == 2
    CoLLAT.from_pretrained(str(tmp_path / T.CHECKPOINT_DIR))  # still a whole, loadable checkpoint


def test_end_to_end_with_evaluation(template, tmp_path):
    eval_sets = {"seen top-1": (ToneDataset(8, seed=1), False), "mixture mAP": (ToneDataset(8, seed=2, multi=True), True)}
    result = run(template, tmp_path, eval_sets=eval_sets, steps=2, evaluate=True)
    for table in (result["untrained"], result["trained"]):
        assert set(table) == {"seen top-1", "seen top-1 noisy", "mixture mAP", "mixture mAP noisy"}
        assert all(0.0 <= v <= 1.0 for v in table.values())
    saved = json.loads((tmp_path / T.RESULTS_NAME).read_text())
    assert saved["trained"] == result["trained"] and saved["model_config"]["audio_size"] == "micro"
    rows = T.read_log(str(tmp_path / T.LOG_NAME))
    assert [r["step"] for r in rows] == [0, 1]
    assert {"loss", "l_ct", "l_cg", "l_ut", "logit_scale", "lr", "grad_norm", "samples_per_s"} <= set(rows[0])
    assert "untrained" in T.format_table(result["untrained"], result["trained"], {"seen top-1": 0.25})


def test_missing_soundfont_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("COLLAT_SOUNDFONT", str(tmp_path / "none.sf2"))
    with pytest.raises(FileNotFoundError, match="soundfont not found"):
        T.run(model_config(), train_config(tmp_path))
    assert T.main(["--out", str(tmp_path), "--steps", "1", "--no-progress"]) == 1


def test_epoch_batches_shard_the_global_batch():
    one = T.epoch_batches(32, 8, T.World(0, 0, 1), seed=0, epoch=0)
    two = [T.epoch_batches(32, 8, T.World(r, r, 2), seed=0, epoch=0) for r in range(2)]
    for s in range(len(one)):
        assert sorted(two[0][s] + two[1][s]) == sorted(one[s])  # each step sees the same global batch
    assert T.epoch_batches(32, 8, T.World(), seed=0, epoch=1) != one


def test_cli_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"interaction_depth": 2, "lambda_cg": 0.5}, "train": {"steps": 7, "lr": 1e-3}}))
    model_cfg, train_cfg = T.parse_args(["--config", str(path), "--steps", "9", "--matching", "optimal", "--reference-ops"])
    assert model_cfg.interaction_depth == 2 and model_cfg.lambda_cg == 0.5 and model_cfg.matching == "optimal"
    assert not model_cfg.fused and train_cfg.steps == 9 and train_cfg.lr == 1e-3
    default_model, default_train = T.parse_args([])
    assert default_model == T.cpu_model_config() and default_model.lambda_cg == 1.0
    paper, _ = T.parse_args(["--preset", "paper"])
    assert (paper.lambda_ct, paper.lambda_cg, paper.lambda_ut, paper.noisy_fraction) == (1.0, 0.1, 0.01, 1.0)
    path.write_text(json.dumps({"model": {"no_such_knob": 1}}))
    with pytest.raises(SystemExit):
        T.parse_args(["--config", str(path)])


def test_example_configs_parse():
    root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
    for name in sorted(n for n in os.listdir(root) if n.endswith(".json")):
        T.parse_args(["--config", os.path.join(root, name)])
