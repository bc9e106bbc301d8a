"""WebDataset shards: manifest -> shards -> the same samples; splitting by node and worker; bad data."""
import hashlib
import io
import json
import os

import numpy as np
import pytest
import soundfile
import torch
import webdataset as wds

from collat.data.collate import collate
from collat.data.manifest import ManifestDataset, ManifestEntry, write_manifest
from collat.data.shards import ShardDataset, main, shard_urls, write_shards
from collat.prompts import make_prompt


def write_clip(path, k, seconds=0.5, sample_rate=16000, channels=1):
    rng = np.random.default_rng(k)
    data = (0.3 * rng.standard_normal((int(seconds * sample_rate), channels))).clip(-1, 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    soundfile.write(path, data, sample_rate, subtype="PCM_16")
    return path


@pytest.fixture
def manifest(tmp_path):
    names = ["dog", "rain", "violin", "Child speech, kid speaking"]
    entries = []
    for k in range(7):
        path = write_clip(str(tmp_path / "audio" / f"c{k}.wav"), k, seconds=0.25 + 0.1 * k)
        labels = [names[k % 4]] + ([names[(k + 1) % 4]] if k % 3 == 0 else [])
        captions = ["a caption", "another"] if k == 5 else []
        entries.append(ManifestEntry(path, labels, captions, "test" if k == 6 else "train"))
    return write_manifest(entries, str(tmp_path / "manifest.jsonl"))


def keys_of(dataset):
    """One key per sample that train-mode label shuffling leaves alone (use clip_seconds=None: no crop)."""
    return [hashlib.sha1(item["wave"].numpy().tobytes()).hexdigest() + "|" + ",".join(sorted(item["names"]))
            for item in dataset]


def test_round_trip_gives_identical_samples(tmp_path, manifest):
    out = str(tmp_path / "shards")
    result = write_shards(manifest, out, split="train", samples_per_shard=2)
    assert result["samples"] == 6 and result["skipped"] == 0
    sizes = json.load(open(os.path.join(out, "sizes.json")))
    assert sizes == {"shard-000000.tar": 2, "shard-000001.tar": 2, "shard-000002.tar": 2}
    assert json.load(open(os.path.join(out, "classes.json"))) == ["Child speech, kid speaking", "dog", "rain",
                                                                 "violin"]
    assert sorted(os.listdir(out)) == ["classes.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar",
                                       "sizes.json"]
    for clip_seconds in (None, 0.5):
        reference = ManifestDataset(manifest, split="train", mode="eval", clip_seconds=clip_seconds)
        streamed = list(ShardDataset(out, clip_seconds=clip_seconds))
        assert len(streamed) == len(reference) == 6
        for k, item in enumerate(streamed):
            expected = reference[k]
            assert torch.equal(item["wave"], expected["wave"])  # 16-bit 16 kHz sources: bit-identical
            assert torch.equal(item["labels"], expected["labels"])
            assert item["text"] == expected["text"] and item["names"] == expected["names"]
    data = ShardDataset(out)
    assert data.num_samples == 6 and data.class_names == reference.class_names
    batch = collate(list(ShardDataset(out, clip_seconds=0.5)))
    assert batch["wave"].shape == (6, 8000) and batch["labels"].shape == (6, 4)


def test_command_line(tmp_path, manifest):
    main([manifest, str(tmp_path / "cli"), "--split", "test", "--samples-per-shard", "5"])
    assert json.load(open(tmp_path / "cli" / "sizes.json")) == {"shard-000000.tar": 1}
    (item,) = list(ShardDataset(str(tmp_path / "cli"), clip_seconds=None))
    assert item["names"] == ["Child speech, kid speaking", "violin"]


def test_shards_store_16k_mono_from_44k_stereo(tmp_path):
    path = write_clip(str(tmp_path / "a.wav"), 0, seconds=1.0, sample_rate=44100, channels=2)
    entries = [ManifestEntry(path, ["dog"])]
    write_shards(entries, str(tmp_path / "s"))
    (item,) = list(ShardDataset(str(tmp_path / "s"), clip_seconds=None))
    reference = ManifestDataset(entries, clip_seconds=None)[0]["wave"]
    assert item["wave"].shape == reference.shape == (16000,)
    # Stored as 16-bit FLAC: equal up to rounding to 1/32768.
    torch.testing.assert_close(item["wave"], reference.clamp(-1, 1), atol=1.0 / 32768, rtol=0)


def test_split_by_worker_and_by_node(tmp_path, manifest, monkeypatch):
    out = str(tmp_path / "shards")
    write_shards(manifest, out, samples_per_shard=2)  # 7 samples in 4 shards
    everything = sorted(keys_of(ShardDataset(out, clip_seconds=None)))
    assert len(everything) == 7
    loader = torch.utils.data.DataLoader(ShardDataset(out, clip_seconds=None), batch_size=None, num_workers=2)
    assert sorted(keys_of(loader)) == everything
    per_node = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_node.append(keys_of(ShardDataset(out, clip_seconds=None)))
    assert per_node[0] and per_node[1] and sorted(per_node[0] + per_node[1]) == everything
    # Training shuffles the shard order, the same way on every rank, so the split stays disjoint.
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        per_node[rank] = keys_of(ShardDataset(out, clip_seconds=None, mode="train", seed=4))
    assert sorted(per_node[0] + per_node[1]) == everything


def test_train_mode_shuffles_deterministically(tmp_path, manifest):
    out = str(tmp_path / "shards")
    write_shards(manifest, out, samples_per_shard=1)
    first = keys_of(ShardDataset(out, clip_seconds=None, mode="train", seed=1, shuffle_buffer=3))
    again = keys_of(ShardDataset(out, clip_seconds=None, mode="train", seed=1, shuffle_buffer=3))
    assert first == again and sorted(first) == sorted(keys_of(ShardDataset(out, clip_seconds=None)))
    orders = set()
    for epoch in range(4):
        data = ShardDataset(out, clip_seconds=None, mode="train", seed=1)
        data.set_epoch(epoch)
        orders.add(tuple(keys_of(data)))
    assert len(orders) > 1


def test_broken_files_and_samples_are_skipped_and_counted(tmp_path, manifest, capsys):
    clips = sorted((tmp_path / "audio").iterdir())
    clips[2].write_bytes(b"not audio")
    result = write_shards(manifest, str(tmp_path / "s"), split="train")
    assert result["samples"] == 5 and result["skipped"] == 1
    captured = capsys.readouterr()
    assert str(clips[2]) in captured.err and "1 unreadable file(s) skipped" in captured.err
    # A shard with a corrupt audio member and one without its .json: both skipped, the rest read.
    bad = str(tmp_path / "bad" / "shard-000000.tar")
    os.makedirs(os.path.dirname(bad))
    good = io.BytesIO()
    soundfile.write(good, np.zeros(800, np.float32) + 0.1, 16000, format="FLAC")
    meta = json.dumps({"text": [], "tag": ["dog"]}).encode()
    with wds.TarWriter(bad) as writer:
        writer.write({"__key__": "000", "flac": good.getvalue(), "json": meta})
        writer.write({"__key__": "001", "flac": b"fLaC garbage", "json": meta})
        writer.write({"__key__": "002", "flac": good.getvalue()})
        writer.write({"__key__": "003", "flac": good.getvalue(), "json": meta})
    data = ShardDataset([bad], class_names=["dog"], clip_seconds=None)
    items = list(data)
    assert len(items) == 2 and data.skipped == 2
    err = capsys.readouterr().err
    assert "shard-000000.tar:001" in err and "shard-000000.tar:002" in err


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        shard_urls(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing"):
        ShardDataset([str(tmp_path / "none.tar")], class_names=["dog"])
    with pytest.raises(ValueError, match="no manifest rows"):
        write_shards([ManifestEntry("x.wav", ["dog"], [], "train")], str(tmp_path / "s"), split="test")
    with pytest.raises(ValueError, match="mode"):
        ShardDataset([], class_names=[], mode="fit")


def test_malformed_json_members_are_skipped_and_a_string_tag_is_one_label(tmp_path, capsys):
    # Issue 17 item 5: a .json that is a list, or has "text": 5, stopped the whole stream with an
    # AttributeError / TypeError; "tag": "dog" became the labels d, o, g.
    clip = io.BytesIO()
    soundfile.write(clip, np.zeros(800, np.float32) + 0.1, 16000, format="FLAC")
    members = {
        "000": [1, 2],                              # not an object
        "001": {"text": 5, "tag": ["dog"]},         # text is not a string
        "002": {"tag": "dog"},                      # one label, as a string
        "003": {"tag": [1]},                        # a label that is not a string
        "004": {"tag": ["cat"]},                    # a label classes.json does not list
        "005": {},                                  # no text at all
        "006": {"text": "a dog barks", "tag": ["dog"]},
    }
    path = str(tmp_path / "shard-000000.tar")
    with wds.TarWriter(path) as writer:
        for key, meta in members.items():
            writer.write({"__key__": key, "flac": clip.getvalue(), "json": json.dumps(meta).encode()})
    data = ShardDataset([path], class_names=["dog", "o", "g", "d"], clip_seconds=None)
    items = list(data)  # the stream goes on past every malformed member
    assert [item["names"] for item in items] == [["dog"], ["dog"]]
    assert items[0]["text"] == make_prompt(["dog"]) and items[0]["labels"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert items[1]["text"] == "a dog barks"
    assert data.skipped == 5
    err = capsys.readouterr().err
    for key, reason in (("000", "expected an object"), ("001", "'text' must be a string"),
                        ("003", "'tag' must be a string"), ("004", "not in class_names"), ("005", "no text")):
        line = next(line for line in err.splitlines() if f"shard-000000.tar:{key}" in line)
        assert reason in line, line


def test_the_brace_pattern_of_the_written_shards(tmp_path, manifest):
    # The README's pattern for a shard folder written by write_shards: DIR/shard-{000000..00000N}.tar
    out = str(tmp_path / "shards")
    write_shards(manifest, out, split="train", samples_per_shard=2)
    urls = shard_urls(out + "/shard-{000000..000002}.tar")
    assert [os.path.basename(url) for url in urls] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert len(list(ShardDataset(urls, clip_seconds=None))) == 6
