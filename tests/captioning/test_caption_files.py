"""`python -m collat.captioning caption FILE... --captioner DIR`: captioning new files with a saved captioner."""
import json
import os

import numpy as np
import pytest
import soundfile
import torch

from collat import captioning
from collat.captioning import caption as caption_lib
from collat.captioning.__main__ import main as captioning_main
from collat.model import load_model


def _wav(path, seconds, seed=0):
    soundfile.write(path, 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000)).astype(np.float32),
                    16000, subtype="FLOAT")
    return str(path)


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory):
    """A captioner trained for two epochs by the CLI on a small captioned manifest, saved with --save."""
    root = tmp_path_factory.mktemp("captioned")
    rows = []
    for split, count in (("train", 4), ("test", 2)):
        for i in range(count):
            name = f"{split}{i}.wav"
            _wav(root / name, 0.75, seed=i)
            rows.append({"path": name, "split": split, "captions": [f"noise number {i}", "a hiss of noise"]})
    (root / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    saved = root / "captioner"
    code = captioning_main(["train", "--model", str(model_dir), "--manifest", str(root / "caps.jsonl"), "--epochs", "2",
                            "--dim", "32", "--beam", "2", "--out", str(root / "results.json"), "--save", str(saved)])
    assert code == 0
    return saved, root


def test_caption_files_with_a_saved_captioner(trained, model_dir, tmp_path, capsys):
    saved, root = trained
    capsys.readouterr()
    files = [_wav(tmp_path / "a.wav", 1.0, seed=5), _wav(tmp_path / "long.wav", 2.6, seed=6)]
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio")
    out = tmp_path / "captions.json"
    code = captioning_main(["caption", *files, str(broken), "--captioner", str(saved), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1  # one file failed; the others are captioned
    payload = json.loads(out.read_text())
    assert [c["file"] for c in payload["captions"]] == files and payload["beam"] == 2  # the beam it was scored with
    assert payload["model"] == os.path.abspath(model_dir)  # the CoLLAT the captioner recorded
    assert "cannot read audio" in payload["errors"][0]["error"] and "broken.wav" in captured.err
    lines = captured.out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == files

    # The captions are the decoder's beam search on the model's features of each file (long file: windows averaged).
    model = load_model(model_dir)
    captioner = caption_lib.Captioner.load(str(saved))
    waves = [torch.from_numpy(soundfile.read(f, dtype="float32")[0]) for f in files]
    memory = caption_lib.extract_memory(model, waves, captioner.features)
    expected = captioner.decode(memory, beam=2, length_penalty=1.0)
    assert [c["caption"] for c in payload["captions"]] == expected
    assert lines == [f"{f}\t{c}" for f, c in zip(files, expected)]
    greedy = [captioner.vocab.decode(ids) for ids in captioner.decoder.greedy(memory, captioner.vocab)]
    assert captioning_main(["caption", *files, "--captioner", str(saved), "--model", str(model_dir), "--beam", "1",
                            "--json", "--batch-size", "1"]) == 0
    assert [c["caption"] for c in json.loads(capsys.readouterr().out)["captions"]] == greedy


def test_caption_refuses_a_mismatched_model_or_captioner(trained, tmp_path, capsys):
    from collat.model import CoLLAT, CoLLATConfig

    saved, _ = trained
    other = tmp_path / "other"
    CoLLAT(CoLLATConfig(audio_size="micro", clip_seconds=0.5, interaction_depth=1, interaction_heads=6,
                        context_length=20)).save_pretrained(str(other))
    path = _wav(tmp_path / "a.wav", 0.5)
    assert captioning_main(["caption", path, "--captioner", str(saved), "--model", str(other)]) == 1
    assert "features of shape [16, 384]" in capsys.readouterr().err
    assert captioning_main(["caption", path, "--captioner", str(tmp_path / "none")]) == 1
    assert "captioner.json" in capsys.readouterr().err
    meta = json.loads((saved / "captioner.json").read_text())
    moved = tmp_path / "moved"
    captioning.save_captioner(moved, *captioning.load_captioner(saved)[:2], {**meta, "collat_model": "/gone"})
    assert captioning_main(["caption", path, "--captioner", str(moved)]) == 1
    assert "pass --model DIR" in capsys.readouterr().err


def test_train_is_the_default_subcommand_and_help_names_caption(capsys):
    with pytest.raises(SystemExit):
        captioning_main(["--help"])
    assert "caption FILE..." in capsys.readouterr().out
    with pytest.raises(SystemExit):
        captioning_main(["caption", "--help"])
    assert "--captioner" in capsys.readouterr().out
