"""collat.evaluate: features match the model's own methods, probes learn, the CLI runs end to end
on a tiny untrained model and fails cleanly (exit code, nothing written) on bad input."""
import json

import numpy as np
import pytest
import soundfile
import torch

from collat import evaluate, fileio
from collat.evaluate import Noise, metrics
from collat.evaluate.__main__ import main as evaluate_main
from collat.model import load_model


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


def _waves(count, seconds=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [0.3 * torch.randn(int(seconds * 16000), generator=generator) for _ in range(count)]


def test_extract_features_matches_the_model_methods(model):
    waves = _waves(3)
    features = evaluate.extract_features(model, waves, batch_size=2, conditioning=True)
    torch.testing.assert_close(features["embedding"], model.encode_audio(waves, batch_size=2).cpu(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features["conditioning"], model.conditioning(waves, batch_size=2).cpu(), atol=1e-5, rtol=1e-5)
    fbank = evaluate.extract_features(model, waves, batch_size=2, noise=Noise("fbank", 0.1, 3))
    expected = model.encode_audio(waves, batch_size=2, noise_std=0.1, noise_seed=3).cpu()
    torch.testing.assert_close(fbank["embedding"], expected, atol=1e-5, rtol=1e-5)
    wave_noise = evaluate.extract_features(model, waves, batch_size=2, noise=Noise("waveform", 0.1, 3))
    expected = model.encode_audio(metrics.add_waveform_noise(waves, 0.1, 3), batch_size=2).cpu()
    torch.testing.assert_close(wave_noise["embedding"], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(wave_noise["embedding"], features["embedding"])


def test_prompt_cosine_ranks_like_model_zero_shot(model):
    waves = _waves(4, seed=1)
    labels = ["violin", "dog barking", "snare drum"]
    cosine = evaluate.extract_features(model, waves)["embedding"] @ evaluate.class_prompt_embeddings(model, labels).T
    torch.testing.assert_close(cosine, model.zero_shot(waves, labels, multi_label=True).cpu(), atol=1e-5, rtol=1e-5)
    assert torch.equal(cosine.argmax(1), model.zero_shot(waves, labels).argmax(1).cpu())


def _separable(num, classes=3, memory_len=4, dim=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    target = torch.arange(num) % classes
    centres = 2.0 * torch.randn(classes, memory_len, dim, generator=generator)
    memory = centres[target] + 0.3 * torch.randn(num, memory_len, dim, generator=generator)
    return memory, torch.nn.functional.one_hot(target, classes).float()


def test_decoder_probe_learns_separable_classes():
    train_x, train_y = _separable(60)
    test_x, test_y = _separable(30, seed=0)
    scores = evaluate.decoder_probe(train_x, train_y, test_x, multi_label=False,
                                    training=evaluate.ProbeTraining(epochs=10, batch_size=30, lr=5e-3))
    assert metrics.topk_accuracy(scores, test_y) > 0.9
    multi_y = train_y.clone()
    multi_y[:, 0] = 1.0  # class 0 everywhere: a second positive for most clips
    scores = evaluate.decoder_probe(train_x, multi_y, test_x, multi_label=True,
                                    training=evaluate.ProbeTraining(epochs=10, batch_size=30, lr=5e-3))
    assert scores.shape == test_y.shape and 0 <= scores.min() and scores.max() <= 1


def test_logistic_probe_single_and_multi_label():
    train_x, train_y = _separable(60, memory_len=1)
    test_x, test_y = _separable(30, memory_len=1)
    scores = evaluate.logistic_probe(train_x[:, 0], train_y, test_x[:, 0], multi_label=False)
    assert metrics.topk_accuracy(scores, test_y) > 0.9
    torch.testing.assert_close(scores.sum(1), torch.ones(30, dtype=scores.dtype))
    multi_y = train_y.clone()
    multi_y[:, 2] = 0.0  # a class never positive in training gets a constant score
    scores = evaluate.logistic_probe(train_x[:, 0], multi_y, test_x[:, 0], multi_label=True)
    assert torch.all(scores[:, 2] == 0)
    assert metrics.mean_average_precision(scores[:, :2], test_y[:, :2]).value > 0.9


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with fileio.atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with fileio.atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_cli_embedded_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = evaluate_main(["--model", str(model_dir), "--test-size", "3", "--train-size", "4", "--probe", "both",
                          "--probe-epochs", "2", "--noise-domain", "waveform", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads(out.read_text())
    assert set(results["sets"]) == {"soundfont/seen-single", "soundfont/heldout-single", "soundfont/seen-mixture"}
    single = results["sets"]["soundfont/seen-single"]["conditions"]
    assert {"zero-shot/top1", "zero-shot/top5", "probe-decoder/top1", "probe-logreg/top1"} <= set(single["clean"])
    assert "zero-shot/top1" in single["noisy-waveform"]
    mixture = results["sets"]["soundfont/seen-mixture"]
    assert mixture["multi_label"] and mixture["num_captions"] >= 2 * 3
    assert {"zero-shot/mAP", "retrieval/audio_to_text/mAP@10", "retrieval/text_to_audio/R@1"} <= set(mixture["conditions"]["clean"])
    values = [v for s in results["sets"].values() for c in s["conditions"].values() for v in c.values()]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert "| soundfont/seen-mixture | zero-shot/mAP |" in capsys.readouterr().out


def _write_manifest(tmp_path):
    rows = []
    generator = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 4)):
        for i in range(count):
            label = ["dog", "cat"][i % 2]
            path = tmp_path / f"{split}{i}.wav"
            soundfile.write(path, (0.2 * generator.standard_normal(16000 if i % 2 else 24000)).astype(np.float32), 16000)
            rows.append({"path": path.name, "labels": [label], "captions": [f"a {label} {split}", f"the {label}"],
                         "split": split})
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wave file")
    rows.append({"path": "broken.wav", "labels": ["dog"], "captions": ["a dog"], "split": "test"})
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return manifest


def test_manifest_evaluation_skips_unreadable_files(model, tmp_path, capsys):
    manifest = _write_manifest(tmp_path)
    sets = evaluate.manifest_sets(str(manifest), clip_seconds=1.0)
    assert len(sets) == 1 and sets[0].skipped == 1 and len(sets[0].waves) == 4
    assert "broken.wav" in capsys.readouterr().err
    options = evaluate.EvalOptions(probes=("logreg",), noise_domains=("fbank",))
    result = evaluate.run_evaluation(model, sets, options, log=lambda _: None)["sets"]["manifest/data/test"]
    assert result["skipped_files"] == 1 and result["num_captions"] == 8 and not result["multi_label"]
    clean = result["conditions"]["clean"]
    assert {"zero-shot/top1", "probe-logreg/top1", "retrieval/audio_to_text/R@1"} <= set(clean)
    assert "zero-shot/top5" not in clean  # only 2 classes
    with pytest.raises(ValueError, match="no rows in split 'val'"):
        evaluate.manifest_sets(str(manifest), clip_seconds=1.0, split="val")


def test_cli_errors_exit_nonzero_and_write_nothing(model_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert evaluate_main(["--model", str(tmp_path / "nope"), "--out", str(out)]) == 1
    assert "not found" in capsys.readouterr().err

    other = tmp_path / "other-version"
    other.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    config["format_version"] = 99
    (other / "config.json").write_text(json.dumps(config))
    (other / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    assert evaluate_main(["--model", str(other), "--out", str(out)]) == 1
    assert "version 99" in capsys.readouterr().err

    assert evaluate_main(["--model", str(model_dir), "--tasks", "zero-shot,dance", "--out", str(out)]) == 1
    assert "unknown task 'dance'" in capsys.readouterr().err
    assert evaluate_main(["--model", str(model_dir), "--manifest", str(tmp_path / "missing.csv"), "--out", str(out)]) == 1
    assert "manifest not found" in capsys.readouterr().err
    assert not out.exists()


def test_ablation_rows_table_and_plot(tmp_path, capsys):
    from collat import ablate

    configs = ablate.row_configs("cpu", ["untrained", "full", "no-ct", "no-ut", "no-cg", "optimal"])
    by_name = {name: config for name, config, _ in configs}
    assert by_name["no-ct"].lambda_ct == 0 and by_name["no-ut"].lambda_ut == 0 and by_name["no-cg"].lambda_cg == 0
    assert by_name["optimal"].matching == "optimal" and by_name["full"].matching == "greedy"
    assert by_name["full"].lambda_ct == by_name["no-ut"].lambda_ct  # rows differ only in what they remove
    with pytest.raises(ValueError, match="unknown ablation row"):
        ablate.row_configs("cpu", ["full", "no-everything"])

    args = ablate.build_parser().parse_args(["--steps", "3"])
    rows = [{"name": name, "config": {"lambda_ct": 1.0, "lambda_cg": 1.0, "lambda_ut": 0.01, "matching": "greedy"},
             "train_seconds": 1.0,
             "results": {"soundfont/seen-single": {c: {"zero-shot/top1": 0.5} for c in ablate.CONDITIONS},
                         "soundfont/seen-mixture": {"clean": {"zero-shot/mAP": 0.25}}}}
            for name in ("full", "no-ct")]
    table = ablate.format_markdown(rows, args)
    assert "| no-ct | 1 | 1 | 0.01 | greedy | 0.500 | 0.500 | 0.500 | 0.250 | - | - | 1 |" in table
    ablate.plot(rows, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"

    assert ablate.main(["--rows", "full,bogus", "--out", str(tmp_path / "abl")]) == 1
    assert "unknown ablation row 'bogus'" in capsys.readouterr().err
    assert ablate.main(["--steps", "0", "--out", str(tmp_path / "abl")]) == 1
    assert not (tmp_path / "abl").exists()
