"""Nonsense on every command line (training, evaluation, prediction, captioning): negative, zero,
non-numeric and non-finite numbers, missing or wrong files, devices that are not there. Each is a
clear error naming the argument or file (exit status 2 for argparse's usage errors, 1 for the rest),
never a raw traceback, never a run that goes on as if nothing were wrong. In-process calls of each
CLI's main(), so a raw exception fails the test with its traceback."""
import json

import numpy as np
import pytest
import soundfile

from collat import predict
from collat.captioning.__main__ import main as captioning_main
from collat.evaluate.__main__ import main as evaluate_main
from collat.train.__main__ import main as train_main

pytestmark = pytest.mark.adversarial


def run_cli(main, argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


TRAIN_USAGE = [  # (argv, words of the message): refused by argparse, before anything runs
    (["--steps", "-3"], "--steps"), (["--steps", "0"], "--steps"), (["--steps", "1.5"], "--steps"),
    (["--batch-size", "0"], "--batch-size"), (["--save-every", "0"], "--save-every"),
    (["--lr", "-1"], "--lr"), (["--lr", "inf"], "--lr"), (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--grad-clip", "-2"], "--grad-clip"), (["--eval-every", "-1"], "--eval-every"),
    (["--log-every", "0"], "--log-every"), (["--num-workers", "-1"], "--num-workers"),
    (["--clip-seconds", "0"], "--clip-seconds"), (["--clip-seconds", "nan"], "--clip-seconds"),
    (["--interaction-heads", "0"], "--interaction-heads"), (["--depth", "0"], "--interaction-depth"),
    (["--noisy-fraction", "2"], "--noisy-fraction"), (["--lambda-cg", "-1"], "--lambda-cg"),
    (["--target-frames", "3"], "--target-frames"), (["--patch-stride", "17"], "--patch-stride"),
    (["--amp", "fp8"], "--amp"), (["--report-to", "wandb"], "--report-to"), (["--stop-at-step", "0"], "--stop-at-step"),
    (["--config", "/nonexistent.yaml"], "config file not found"), (["--config", "/"], "config file not found"),
]


@pytest.mark.parametrize("argv, words", TRAIN_USAGE)
def test_training_usage_errors(argv, words, capsys):
    code, err = run_cli(train_main, argv, capsys)
    assert code == 2 and words in err


def test_training_config_files(tmp_path, capsys):
    cases = {"binary.json": b"\x80\x81\x00", "notes.txt": b"{}", "deep.yaml": b"train: {steps: {a: 1}}",
             "tagged.yaml": b"train: !!python/object/apply:os.system [echo pwned]"}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        code, err = run_cli(train_main, ["--config", str(path)], capsys)
        assert code == 2 and str(path) in err, (name, err)


@pytest.mark.parametrize("extra, words", [
    (["--train-manifest", "/nonexistent/m.csv"], "manifest not found"),
    (["--train-shards", "/nonexistent/shards"], "missing"),
    (["--eval-manifest", "/nonexistent/m.csv"], "manifest not found"),
    (["--device", "banana"], "device must be"),
    (["--device", "cuda:7"], "device cuda:7"),
])
def test_training_run_errors(extra, words, tmp_path, capsys):
    code, err = run_cli(train_main, ["--out", str(tmp_path / "run"), "--steps", "1", "--no-progress", *extra], capsys)
    assert code == 1 and err.startswith("error: ") and words in err, err


def test_training_resume_of_a_broken_checkpoint(tmp_path, capsys):
    folder = tmp_path / "run" / "checkpoint"
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "trainer_state.safetensors"):
        (folder / name).write_bytes(b"junk")
    (folder / "trainer_state.json").write_text('{"state": {"step": 3}}')
    code, err = run_cli(train_main, ["--out", str(tmp_path / "run"), "--resume", "--steps", "4", "--no-progress",
                                     "--audio-size", "micro", "--depth", "1", "--clip-seconds", "0.5", "--no-eval",
                                     "--train-size", "64"], capsys)
    assert code == 1 and str(folder) in err, err


EVALUATE = [
    (["--test-size", "0"], 2, "--test-size"), (["--test-size", "-5"], 2, "--test-size"),
    (["--train-size", "-1"], 2, "--train-size"), (["--batch-size", "0"], 2, "--batch-size"),
    (["--probe-epochs", "0"], 2, "--probe-epochs"), (["--noise-std", "-0.1"], 2, "--noise-std"),
    (["--noise-std", "nan"], 2, "--noise-std"), (["--test-size", "many"], 2, "--test-size"),
    (["--tasks", ","], 1, "--tasks names no task"), (["--tasks", "zero-shot,dance"], 1, "unknown task"),
    (["--folds"], 1, "--folds needs"), (["--esc50", "/nonexistent"], 1, "meta/esc50.csv"),
    (["--manifest", "/nonexistent.csv"], 1, "manifest not found"), (["--device", "cuda:3"], 1, "cuda:3"),
]


@pytest.mark.parametrize("argv, code, words", EVALUATE)
def test_evaluation_errors(argv, code, words, model_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    got, err = run_cli(evaluate_main, ["--model", str(model_dir), "--out", str(out), *argv], capsys)
    assert got == code and words in err, err
    assert not out.exists()


def broken_checkpoints(model_dir, root):
    config = json.loads((model_dir / "config.json").read_text())
    weights = (model_dir / "model.safetensors").read_bytes()
    cases = {
        "list": (json.dumps([1, 2]), weights, "config.json"),
        "no-config-key": (json.dumps({"architecture": "CoLLAT", "format_version": 1}), weights, "config.json"),
        "binary-config": (b"\x80\x04\x95".decode("latin-1"), weights, "config.json"),
        "truncated": (json.dumps(config), weights[:100], "model.safetensors"),
        "empty-weights": (json.dumps(config), b"", "model.safetensors"),
        "pickle-weights": (json.dumps(config), b"\x80\x04\x95\x00\x00", "model.safetensors"),
        "huge-clip": (json.dumps({**config, "config": {**config["config"], "clip_seconds": 1e6}}), weights,
                      "config.json"),
        "text-depth": (json.dumps({**config, "config": {**config["config"], "interaction_depth": "8"}}), weights,
                       "config.json"),
    }
    for name, (text, blob, culprit) in cases.items():
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text(text, encoding="latin-1")
        (folder / "model.safetensors").write_bytes(blob)
        yield folder, culprit


@pytest.mark.parametrize("cli", ["evaluate", "predict"])
def test_broken_checkpoints_name_the_file(cli, model_dir, tmp_path, capsys):
    wav = tmp_path / "a.wav"
    soundfile.write(wav, np.zeros(16000, np.float32), 16000)
    (tmp_path / "ckpts").mkdir()
    for folder, culprit in broken_checkpoints(model_dir, tmp_path / "ckpts"):
        if cli == "evaluate":
            code, err = run_cli(evaluate_main, ["--model", str(folder), "--out", str(tmp_path / "e.json")], capsys)
        else:
            code, err = run_cli(predict.main, [str(wav), "--model", str(folder), "--labels", "dog"], capsys)
        assert code == 1 and str(folder / culprit) in err, (folder.name, err)


@pytest.mark.parametrize("argv, words", [
    (["--top-k", "-1"], "--top-k"), (["--batch-size", "0"], "--batch-size"), (["--min-seconds", "-1"], "--min-seconds"),
    (["--max-seconds", "inf"], "--max-seconds"), (["--max-seconds", "0"], "--max-seconds"),
    (["--long-audio", "stretch"], "--long-audio"),
])
def test_prediction_usage_errors(argv, words, model_dir, capsys):
    code, err = run_cli(predict.main, ["a.wav", "--model", str(model_dir), "--labels", "dog", *argv], capsys)
    assert code == 2 and words in err


@pytest.mark.parametrize("argv, code, words", [
    (["--epochs", "0"], 1, "--epochs"), (["--batch-size", "-4"], 1, "--batch-size"), (["--beam", "0"], 1, "--beam"),
    (["--dim", "0"], 1, "--dim"), (["--epochs", "ten"], 2, "--epochs"), (["--lr", "fast"], 2, "--lr"),
])
def test_captioning_usage_errors(argv, code, words, model_dir, tmp_path, capsys):
    got, err = run_cli(captioning_main, ["--model", str(model_dir), "--out", str(tmp_path / "c.json"), *argv], capsys)
    assert got == code and words in err, err
