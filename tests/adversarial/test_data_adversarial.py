"""Corrupt, huge and odd audio files, malformed manifests and shard members, generated small in each test.
Every case gives a correct result or a clear error naming the file (AudioReadError for audio, which
the data sets report, skip and count; ValueError for manifests), never a raw traceback or silence."""
import io
import json
import os
import pickle

import numpy as np
import pytest
import soundfile
import torch
import webdataset as wds

from collat.data.audio_io import AudioReadError, load_audio
from collat.data.manifest import ManifestDataset, read_manifest
from collat.data.shards import ShardDataset

pytestmark = pytest.mark.adversarial


def tone(seconds=0.5, rate=16000, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([0.3 * np.sin(2 * np.pi * 440 * t)] * channels, axis=1).astype(np.float32)


def patched_wav(path, offset, value: bytes, seconds=0.5):
    soundfile.write(path, tone(seconds), 16000, subtype="PCM_16")
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(value)
    return str(path)


def nan_wav(path):
    data = tone(0.2)
    data[100] = np.nan
    soundfile.write(path, data, 16000, subtype="FLOAT")
    return str(path)


BROKEN = {  # name -> (make(path), words the error must contain)
    "random-bytes.wav": (lambda p: p.write_bytes(os.urandom(2000)), "not decodable"),
    "random-bytes.flac": (lambda p: p.write_bytes(b"fLaC" + os.urandom(500)), "not decodable"),
    "text.ogg": (lambda p: p.write_text("OggS? no, just text"), "not decodable"),
    "empty.wav": (lambda p: p.write_bytes(b""), "empty"),
    "header-only.wav": (lambda p: p.write_bytes(open(patched_wav(p, 0, b"RIFF"), "rb").read()[:44]), "no audio frames"),
    "zero-rate.wav": (lambda p: patched_wav(p, 24, (0).to_bytes(4, "little")), "not decodable"),
    "nan.wav": (nan_wav, "NaN"),
    "a-folder.wav": (lambda p: p.mkdir(), "directory"),
    "fifo.wav": (lambda p: os.mkfifo(p), "empty"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
@pytest.mark.parametrize("clip_seconds", [None, 0.25])
def test_broken_audio_is_an_error_naming_the_file(tmp_path, name, clip_seconds):
    make, words = BROKEN[name]
    path = tmp_path / name
    make(path)
    with pytest.raises(AudioReadError, match=words) as info:
        load_audio(str(path), 16000, clip_seconds=clip_seconds)
    assert info.value.path == str(path) and str(path) in str(info.value)


def test_a_symlink_loop_is_missing_not_a_hang(tmp_path):
    os.symlink(tmp_path / "b.wav", tmp_path / "a.wav")
    os.symlink(tmp_path / "a.wav", tmp_path / "b.wav")
    with pytest.raises(AudioReadError, match="no such file"):
        load_audio(str(tmp_path / "a.wav"))


@pytest.mark.parametrize("rate, channels, seconds", [(8000, 8, 0.3), (192000, 2, 0.1), (16000, 1, 1 / 16000),
                                                     (44100, 1, 0.001), (22050, 3, 0.6)])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_odd_but_valid_audio_reads_to_the_asked_length(tmp_path, rate, channels, seconds, mode):
    path = str(tmp_path / "odd.wav")
    soundfile.write(path, tone(seconds, rate, channels), rate, subtype="PCM_24")
    wave = load_audio(path, 16000, clip_seconds=0.25, mode=mode, rng=np.random.default_rng(1))
    assert wave.shape == (4000,) and wave.dtype == torch.float32 and torch.isfinite(wave).all()
    whole = load_audio(path, 16000)
    assert whole.shape[0] == max(1, -(-int(round(seconds * rate)) * 16000 // rate))


def test_a_file_cut_short_reads_what_is_there(tmp_path):
    """A WAV cut short (its header claims 10 s, 0.2 s are there): libsndfile counts the frames that are
    there, so every crop reads real samples and pads the rest; nothing fails, nothing is made up."""
    path = str(tmp_path / "cut.wav")
    soundfile.write(path, tone(10.0), 16000, subtype="PCM_16")
    with open(path, "r+b") as handle:
        handle.truncate(44 + 2 * 3200)
    for mode, seed in (("eval", 0), *(("train", seed) for seed in range(4))):
        wave = load_audio(path, 16000, clip_seconds=0.5, mode=mode, rng=np.random.default_rng(seed))
        assert wave.shape == (8000,) and wave[:3200].abs().max() > 0.1 and not wave[3200:].any()


def test_unreadable_files_in_a_data_set_are_reported_skipped_and_counted(tmp_path, capsys):
    good = tmp_path / "good.wav"
    soundfile.write(good, tone(0.3), 16000)
    rows = [{"path": "good.wav", "labels": ["dog"]}]
    for name in ("random-bytes.wav", "nan.wav", "empty.wav"):
        BROKEN[name][0](tmp_path / name)
        rows.append({"path": name, "labels": ["dog"]})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = ManifestDataset(str(manifest), clip_seconds=0.25)
    items = [data[k] for k in range(len(data))]
    assert all(torch.equal(item["wave"], items[0]["wave"]) for item in items) and data.skipped == 3
    err = capsys.readouterr().err
    assert all(name in err for name in ("random-bytes.wav", "nan.wav", "empty.wav"))


# ------------------------------------------------------------------------------------------ manifests
MANIFESTS = {  # file name -> (bytes, words the error must contain)
    "no-header.csv": (b"a.wav,dog,,train\n", "'path' column"),
    "empty.csv": (b"", "'path' column"),
    "latin1.csv": ("path,labels\nchien.wav,\xe9t\xe9\n".encode("latin-1"), "UTF-8"),
    "nul.csv": (b"path,labels\n\x00a.wav,dog\n", "line 2"),
    "blank-path.csv": (b"path,labels\n ,dog\n", "empty 'path'"),
    "list.jsonl": (b'[1, 2]\n', "line 1"),
    "number-path.jsonl": (b'{"path": 5}\n', "line 1"),
    "number-labels.jsonl": (b'{"path": "a.wav", "labels": 5}\n', "labels must be a string or a list"),
    "dict-captions.jsonl": (b'{"path": "a.wav", "captions": {"a": 1}}\n', "captions must be"),
    "torn.jsonl": (b'{"path": "a.wav"}\n{"path": "b.w', "line 2"),
    "latin1.jsonl": ('{"path": "\xe9.wav"}\n'.encode("latin-1"), "UTF-8"),
    "manifest.txt": (b"path\na.wav\n", ".csv or .jsonl"),
}


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_malformed_manifests_are_errors_naming_the_file(tmp_path, name):
    content, words = MANIFESTS[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=words) as info:
        read_manifest(str(path))
    assert name in str(info.value)


def test_rows_without_text_are_refused_naming_the_row(tmp_path):
    soundfile.write(tmp_path / "a.wav", tone(0.2), 16000)
    path = tmp_path / "m.csv"
    path.write_text("path,labels\na.wav, ; ;;\n")
    (entry,) = read_manifest(str(path))
    assert entry.labels == []
    with pytest.raises(ValueError, match="a.wav has no labels and no caption"):
        ManifestDataset(str(path))


# ------------------------------------------------------------------------------------------ shards
def flac_bytes():
    buffer = io.BytesIO()
    soundfile.write(buffer, tone(0.1), 16000, format="FLAC")
    return buffer.getvalue()


class Planted:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_members_in_a_shard_are_never_unpickled(tmp_path):
    """webdataset's default decoders would unpickle .pyd / .pickle members; collat decodes only its own."""
    marker = tmp_path / "pwned"
    path = str(tmp_path / "shard-000000.tar")
    with wds.TarWriter(path) as writer:
        writer.write({"__key__": "000", "flac": flac_bytes(), "json": json.dumps({"tag": ["dog"]}).encode(),
                      "pyd": pickle.dumps(Planted(marker)), "pickle": pickle.dumps(Planted(marker))})
    items = list(ShardDataset([path], class_names=["dog"], clip_seconds=None))
    assert len(items) == 1 and items[0]["names"] == ["dog"] and not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a tar file at all" * 50, "truncated"])
def test_broken_tar_files_are_skipped_and_counted(tmp_path, content, capsys):
    good = str(tmp_path / "shard-000001.tar")
    with wds.TarWriter(good) as writer:
        for key in ("000", "001"):
            writer.write({"__key__": key, "flac": flac_bytes(), "json": json.dumps({"tag": "dog"}).encode()})
    bad = str(tmp_path / "shard-000000.tar")
    with open(bad, "wb") as handle:
        handle.write(open(good, "rb").read()[:700] if content == "truncated" else content)
    data = ShardDataset([bad, good], class_names=["dog"], clip_seconds=None)
    items = list(data)
    assert len(items) >= 2 and data.skipped >= (0 if content == b"" else 1)
    if data.skipped:
        assert "shard-000000.tar" in capsys.readouterr().err


@pytest.mark.parametrize("name, content, words", [
    ("sizes.json", "{not json", "sizes.json"),
    ("sizes.json", "[1, 2]", "sizes.json"),
    ("sizes.json", '{"shard-000000.tar": "ten"}', "sizes.json"),
    ("classes.json", "{not json", "classes.json"),
    ("classes.json", '{"dog": 1}', "classes.json"),
])
def test_malformed_shard_folder_files_are_errors_naming_the_file(tmp_path, name, content, words):
    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as writer:
        writer.write({"__key__": "000", "flac": flac_bytes(), "json": b'{"tag": "dog"}'})
    (tmp_path / "sizes.json").write_text('{"shard-000000.tar": 1}')
    (tmp_path / "classes.json").write_text('["dog"]')
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=words):
        ShardDataset(str(tmp_path))
