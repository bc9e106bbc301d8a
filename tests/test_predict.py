"""collat.predict: label checks, windows, the CLI end to end on a tiny untrained model, error exits."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

from collat import predict


def _wav(path, seconds, seed=0, rate=16000):
    wave = 0.2 * np.random.default_rng(seed).standard_normal(int(seconds * rate)).astype(np.float32)
    soundfile.write(path, wave, rate)
    return str(path)


def test_read_labels(tmp_path):
    assert predict.read_labels(["dog", " cat "], None) == ["dog", "cat"]
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("# classes\nviolin\n\nsnare drum\n")
    assert predict.read_labels(["dog"], str(labels_file)) == ["dog", "violin", "snare drum"]
    with pytest.raises(ValueError, match="no labels given"):
        predict.read_labels([], None)
    with pytest.raises(ValueError, match="blank"):
        predict.read_labels(["dog", "  "], None)
    with pytest.raises(ValueError, match="duplicate labels"):
        predict.read_labels(["Dog", "cat", "dog"], None)
    with pytest.raises(FileNotFoundError, match="--labels-file"):
        predict.read_labels(None, str(tmp_path / "missing.txt"))


def test_cli_ranks_labels_and_reports_bad_files(model_dir, tmp_path, capsys):
    good = _wav(tmp_path / "one.wav", 1.0)
    long = _wav(tmp_path / "long.flac", 2.6, seed=1)  # 1 s model clips: windows of 1, 1 and 0.6 s
    short = _wav(tmp_path / "short.wav", 0.05)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio at all")
    out = tmp_path / "pred.json"
    labels = ["violin", "dog barking", "snare drum"]
    code = predict.main([good, long, short, str(broken), str(tmp_path / "absent.wav"), "--model", str(model_dir),
                         "--labels", *labels, "--json", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1  # some files failed; the others are still scored
    payload = json.loads(captured.out)
    assert json.loads(out.read_text()) == payload
    assert [p["file"] for p in payload["predictions"]] == [good, long]
    assert [p["windows"] for p in payload["predictions"]] == [1, 3]
    for prediction in payload["predictions"]:
        scores = [r["score"] for r in prediction["ranking"]]
        assert sorted(r["label"] for r in prediction["ranking"]) == sorted(labels)
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-5)
    errors = {os.path.basename(e["file"]): e["error"] for e in payload["errors"]}
    assert "too short" in errors["short.wav"]
    assert "cannot read audio" in errors["broken.wav"] and "no such file" in errors["absent.wav"]
    assert "short.wav" in captured.err


def test_cli_multi_label_scores_are_the_models_cosines(model_dir, tmp_path, capsys):
    path = _wav(tmp_path / "one.wav", 0.8, seed=2)
    labels = ["violin", "dog barking"]
    assert predict.main([path, "--model", str(model_dir), "--labels", *labels, "--multi-label", "--top-k", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(path) and len(text.strip().splitlines()) == 2

    from collat.model import load_model

    model = load_model(model_dir)
    expected = model.zero_shot([torch.from_numpy(soundfile.read(path, dtype="float32")[0])], labels, multi_label=True)[0]
    best = int(expected.argmax())
    assert labels[best] in text and f"{expected[best].item():.4f}" in text


def test_cli_rejects_bad_labels_and_checkpoints(model_dir, tmp_path, capsys):
    path = _wav(tmp_path / "one.wav", 1.0)
    out = tmp_path / "pred.json"
    assert predict.main([path, "--model", str(model_dir), "--out", str(out)]) == 1
    assert "no labels given" in capsys.readouterr().err
    assert predict.main([path, "--model", str(model_dir), "--labels", "dog", "dog", "--out", str(out)]) == 1
    assert "duplicate" in capsys.readouterr().err
    too_long = " ".join(["very"] * 30) + " loud dog"
    assert predict.main([path, "--model", str(model_dir), "--labels", "cat", too_long, "--out", str(out)]) == 1
    assert "too long" in capsys.readouterr().err
    assert predict.main([path, "--model", str(tmp_path / "nope"), "--labels", "dog", "--out", str(out)]) == 1
    assert "not found" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    config["format_version"] = 99
    (other / "config.json").write_text(json.dumps(config))
    assert predict.main([path, "--model", str(other), "--labels", "dog", "--out", str(out)]) == 1
    assert "format version 99" in capsys.readouterr().err
    assert not out.exists()


def test_process_exit_code_for_a_missing_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "collat.predict", "x.wav", "--model", str(tmp_path / "nope"), "--labels", "dog"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "model checkpoint not found" in result.stderr and result.stdout == ""


def _broken_checkpoints(model_dir, root):
    """Checkpoint folders broken in the ways of issue 17 item 14 (and 11), each with the file at fault."""
    config = json.loads((model_dir / "config.json").read_text())
    weights = (model_dir / "model.safetensors").read_bytes()
    cases = {
        "a list": ([1, 2], weights, "config.json", "must hold a JSON object"),
        "no config key": ({k: v for k, v in config.items() if k != "config"}, weights, "config.json", "config"),
        "not json": ("{not json", weights, "config.json", "not valid JSON"),
        "truncated weights": (config, weights[: len(weights) // 2], "model.safetensors", "not a readable safetensors"),
        "huge clip": ({**config, "config": {**config["config"], "clip_seconds": 1e6}}, weights, "config.json",
                      "clip_seconds"),
        "ten steps of depth": ({**config, "config": {**config["config"], "interaction_depth": "ten"}}, weights,
                               "config.json", "interaction_depth must be an int"),
    }
    for name, (payload, blob, culprit, reason) in cases.items():
        folder = root / name.replace(" ", "-")
        folder.mkdir()
        (folder / "config.json").write_text(payload if isinstance(payload, str) else json.dumps(payload))
        (folder / "model.safetensors").write_bytes(blob)
        yield name, folder, culprit, reason


def test_broken_checkpoints_are_clear_errors_naming_the_file(model_dir, tmp_path, capsys):
    path = _wav(tmp_path / "one.wav", 1.0)
    (tmp_path / "ckpts").mkdir()
    for name, folder, culprit, reason in _broken_checkpoints(model_dir, tmp_path / "ckpts"):
        assert predict.main([path, "--model", str(folder), "--labels", "dog"]) == 1, name
        err = capsys.readouterr().err
        assert err.startswith("collat.predict: error: ") and "Traceback" not in err, (name, err)
        assert str(folder / culprit) in err and reason in err, (name, err)


def test_a_header_claiming_hours_is_refused_before_decoding(model_dir, tmp_path, capsys, monkeypatch):
    """Issue 17 item 10 (predict): the length check reads the header; nothing of the file is decoded."""
    path = str(tmp_path / "ten-hours.wav")
    soundfile.write(path, np.zeros(1600, np.float32), 16000, subtype="PCM_16")
    claimed = 10 * 3600 * 16000
    with open(path, "r+b") as handle:
        handle.seek(40)
        handle.write((2 * claimed).to_bytes(4, "little"))
        handle.truncate(44 + 2 * claimed)  # sparse
    decoded = []
    original = soundfile.SoundFile.read
    monkeypatch.setattr(soundfile.SoundFile, "read",
                        lambda self, frames=-1, *a, **k: decoded.append(frames) or original(self, frames, *a, **k))
    good = _wav(tmp_path / "good.wav", 1.0)
    assert predict.main([path, good, "--model", str(model_dir), "--labels", "dog", "cat", "--json"]) == 1
    captured = capsys.readouterr()
    assert "audio too long: 36000.0 s" in captured.err and path in captured.err
    assert [p["file"] for p in json.loads(captured.out)["predictions"]] == [good]
    assert sum(f for f in decoded if f > 0) == 16000  # the good file only


@pytest.mark.parametrize("flag, value", [("--top-k", "0"), ("--batch-size", "-1"), ("--max-seconds", "nan"),
                                         ("--min-seconds", "0"), ("--batch-size", "two")])
def test_nonsense_numbers_are_argument_errors(model_dir, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        predict.main(["x.wav", "--model", str(model_dir), "--labels", "dog", flag, value])
    assert info.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_out_that_cannot_be_written_is_refused_before_the_work(model_dir, tmp_path, capsys):
    path = _wav(tmp_path / "one.wav", 1.0)
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("x")
    assert predict.main([path, "--model", str(model_dir), "--labels", "dog", "--out", str(blocked / "p.json")]) == 1
    captured = capsys.readouterr()
    assert "--out" in captured.err and "cannot be written" in captured.err and captured.out == ""
