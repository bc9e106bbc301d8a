"""Real data from disk: audio reading, manifests, and the ESC-50 / UrbanSound8K / FSD50K / AudioSet readers."""
import csv
import json
import os
import pickle

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from collat.data import readers
from collat.data.audio_io import AudioReadError, fit_length, load_audio
from collat.data.collate import collate
from collat.data.manifest import (
    ManifestDataset,
    ManifestEntry,
    UnreadableDataError,
    check_files_exist,
    read_manifest,
    write_manifest,
)
from collat.prompts import make_prompt


def write_tone(path, seconds=0.5, sample_rate=16000, channels=1, freq=440.0, level=0.5, subtype="PCM_16"):
    """A sine tone; channel c is scaled by (c + 1) so a stereo mix-down is checkable."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    tone = level * np.sin(2 * np.pi * freq * t)
    data = np.stack([tone * (c + 1) / channels for c in range(channels)], axis=1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    soundfile.write(path, data, sample_rate, subtype=subtype)
    return path


# ---------------------------------------------------------------------------------------------------
# audio_io


def test_resamples_44k_stereo_to_16k_mono(tmp_path):
    path = write_tone(str(tmp_path / "a.wav"), seconds=1.0, sample_rate=44100, channels=2, freq=1000.0)
    wave = load_audio(path, 16000)
    assert wave.dtype == torch.float32 and wave.shape == (16000,)
    raw, _ = soundfile.read(path, dtype="float32", always_2d=True)
    expected = torchaudio.functional.resample(torch.from_numpy(raw.mean(axis=1)), 44100, 16000)
    torch.testing.assert_close(wave, expected)
    spectrum = torch.fft.rfft(wave).abs()
    assert int(spectrum.argmax()) == 1000  # 1 s at 16 kHz: bin k is k Hz
    assert abs(wave[2000:14000].abs().max().item() - 0.375) < 0.01  # mean of 0.25 and 0.5 amplitude channels


def test_flac_and_ogg_read(tmp_path):
    for name in ("a.flac", "a.ogg"):
        path = write_tone(str(tmp_path / name), subtype=None if name.endswith("ogg") else "PCM_16")
        assert load_audio(path, 16000).shape == (8000,)


def test_eval_crop_is_fixed_and_train_crop_is_seeded(tmp_path):
    ramp = np.linspace(-0.9, 0.9, 16000).astype(np.float32)
    path = str(tmp_path / "ramp.wav")
    soundfile.write(path, ramp, 16000, subtype="FLOAT")
    start = load_audio(path, 16000, clip_seconds=0.25)
    assert torch.equal(start, torch.from_numpy(ramp[:4000]))
    center = load_audio(path, 16000, clip_seconds=0.25, crop="center")
    assert torch.equal(center, torch.from_numpy(ramp[6000:10000]))
    padded = load_audio(path, 16000, clip_seconds=1.5)
    assert padded.shape == (24000,) and torch.equal(padded[:16000], torch.from_numpy(ramp))
    assert not padded[16000:].any()
    one = load_audio(path, 16000, 0.25, "train", np.random.default_rng(3))
    two = load_audio(path, 16000, 0.25, "train", np.random.default_rng(3))
    assert torch.equal(one, two)
    offsets = {float(load_audio(path, 16000, 0.25, "train", np.random.default_rng(s))[0]) for s in range(8)}
    assert len(offsets) > 1
    with pytest.raises(ValueError, match="mode"):
        fit_length(torch.zeros(10), 5, mode="random")


def test_unreadable_files_raise_audio_read_error(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF this is not audio at all" * 10)
    no_frames = str(tmp_path / "no_frames.wav")
    soundfile.write(no_frames, np.zeros((0, 1), np.float32), 16000)
    cases = {str(tmp_path / "missing.wav"): "no such file", str(empty): "empty", str(garbage): "not decodable",
             no_frames: "no audio frames", str(tmp_path): "directory"}
    for path, reason in cases.items():
        with pytest.raises(AudioReadError, match=reason) as info:
            load_audio(path)
        assert info.value.path == path and path in str(info.value)
        copy = pickle.loads(pickle.dumps(info.value))
        assert (copy.path, copy.reason) == (info.value.path, info.value.reason)
    with pytest.raises(TypeError, match="path"):
        load_audio(123)


# ---------------------------------------------------------------------------------------------------
# manifests


def make_clips(folder, count, seconds=0.5):
    return [write_tone(os.path.join(folder, f"clip{k}.wav"), seconds=seconds, freq=200.0 + 50 * k)
            for k in range(count)]


@pytest.mark.parametrize("extension", ["csv", "jsonl"])
def test_manifest_round_trip(tmp_path, extension):
    clips = make_clips(str(tmp_path / "audio"), 3)
    entries = [
        ManifestEntry(clips[0], ["Child speech, kid speaking", "dog"], [], "train"),
        ManifestEntry(clips[1], [], ["A dog barks, twice"], "test"),
        ManifestEntry(clips[2], ["violin"], ["strings"], ""),
    ]
    path = write_manifest(entries, str(tmp_path / f"manifest.{extension}"))
    text = open(path).read()
    assert "audio/clip0.wav" in text and str(tmp_path) not in text  # relative paths by default
    assert read_manifest(path) == entries
    # Relative paths resolve against the manifest's folder, or against root=.
    moved = read_manifest(path, root="/elsewhere")
    assert moved[0].path == "/elsewhere/audio/clip0.wav"


def test_jsonl_keeps_several_captions(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"path": "x.wav", "captions": ["one", "two"], "caption": "three", "split": "val"}\n\n')
    (entry,) = read_manifest(str(path))
    assert entry.captions == ["one", "two", "three"] and entry.split == "val" and entry.labels == []


def test_bad_manifests_are_clear_errors(tmp_path):
    bad_csv = tmp_path / "m.csv"
    bad_csv.write_text("file,labels\nx.wav,dog\n")
    with pytest.raises(ValueError, match="'path' column"):
        read_manifest(str(bad_csv))
    bad_json = tmp_path / "m.jsonl"
    bad_json.write_text('{"path": "a.wav"}\n{"path": \n')
    with pytest.raises(ValueError, match="line 2"):
        read_manifest(str(bad_json))
    with pytest.raises(ValueError, match=r"\.csv or \.jsonl"):
        read_manifest(str(tmp_path / "m.txt"))
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(str(tmp_path / "none.csv"))


def labelled_manifest(tmp_path, count=6):
    clips = make_clips(str(tmp_path / "audio"), count)
    names = ["dog", "rain", "violin"]
    entries = [ManifestEntry(path, [names[k % 3]] + (["rain"] if k == 3 else []), [],
                             "train" if k < count - 2 else "test") for k, path in enumerate(clips)]
    return write_manifest(entries, str(tmp_path / "manifest.csv")), entries


def test_manifest_dataset_items(tmp_path):
    path, entries = labelled_manifest(tmp_path)
    test = ManifestDataset(path, split="test", clip_seconds=1.0)
    train = ManifestDataset(path, split="train", clip_seconds=0.25, seed=1)
    assert test.class_names == train.class_names == ["dog", "rain", "violin"]  # from every split
    assert len(test) == 2 and len(train) == 4 and test.mode == "eval" and train.mode == "train"
    item = test[0]
    assert item["wave"].shape == (16000,) and item["wave"].dtype == torch.float32
    assert item["names"] == ["rain"] and item["text"] == make_prompt(["rain"])
    assert item["labels"].tolist() == [0.0, 1.0, 0.0] and test[1]["names"] == ["violin"]
    mixed = train[3]
    assert set(mixed["names"]) == {"dog", "rain"} and mixed["labels"].tolist() == [1.0, 1.0, 0.0]
    # Training crops and label order are a function of (seed, index, epoch).
    again = ManifestDataset(path, split="train", clip_seconds=0.25, seed=1)
    assert torch.equal(train[2]["wave"], again[2]["wave"])
    crops = set()
    for epoch in range(6):
        again.set_epoch(epoch)
        crops.add(float(again[2]["wave"][0]))
    assert len(crops) > 1
    batch = collate([train[k] for k in range(4)])
    assert batch["wave"].shape == (4, 4000) and batch["labels"].shape == (4, 3)
    with pytest.raises(ValueError, match="split 'val' has no rows"):
        ManifestDataset(path, split="val")
    with pytest.raises(ValueError, match="not in class_names"):
        ManifestDataset(path, class_names=["dog"])


def test_manifest_dataset_uses_captions(tmp_path):
    clips = make_clips(str(tmp_path / "audio"), 2)
    entries = [ManifestEntry(clips[0], ["dog"], ["a dog barks", "barking"]), ManifestEntry(clips[1], ["rain"])]
    auto = ManifestDataset(entries, clip_seconds=None)
    assert auto[0]["text"] == "a dog barks" and auto[1]["text"] == "This is a sound of rain"
    assert ManifestDataset(entries, text="labels")[0]["text"] == "This is a sound of dog"
    with pytest.raises(ValueError, match="no caption"):
        ManifestDataset(entries, text="caption")
    train_texts = set()
    for epoch in range(8):
        ds = ManifestDataset(entries, mode="train", clip_seconds=None)
        ds.set_epoch(epoch)
        train_texts.add(ds[0]["text"])
    assert train_texts == {"a dog barks", "barking"}


def test_missing_files_fail_fast_listing_paths(tmp_path):
    clips = make_clips(str(tmp_path / "audio"), 1)
    entries = [ManifestEntry(clips[0], ["dog"])] + [
        ManifestEntry(str(tmp_path / f"gone{k}.wav"), ["dog"]) for k in range(8)]
    with pytest.raises(FileNotFoundError) as info:
        ManifestDataset(entries)
    message = str(info.value)
    assert "8 of 9 audio files" in message and "gone0.wav" in message and "gone4.wav" in message
    assert "gone7.wav" not in message and "3 more" in message
    with pytest.raises(FileNotFoundError):
        check_files_exist(entries)
    ManifestDataset(entries[:1])  # nothing missing: no error


def test_broken_files_are_reported_skipped_and_counted(tmp_path, capsys):
    clips = make_clips(str(tmp_path / "audio"), 4)
    with open(clips[1], "wb") as handle:
        handle.write(b"RIFF\x00\x00garbage, not a wave file")
    open(clips[2], "wb").close()  # empty
    entries = [ManifestEntry(path, ["dog"]) for path in clips]
    ds = ManifestDataset(entries, clip_seconds=0.5)
    good = ds[3]
    replacement = ds[1]  # 1 and 2 are unreadable: the next readable row stands in, never zeros
    assert ds.skipped == 2
    assert torch.equal(replacement["wave"], good["wave"]) and replacement["wave"].abs().max() > 0.1
    err = capsys.readouterr().err
    assert clips[1] in err and clips[2] in err and "skipping unreadable audio" in err
    line = ds.summary()
    assert "2 unreadable audio file(s) skipped out of 4" in line
    # Counted across DataLoader worker processes too.
    fresh = ManifestDataset(entries, clip_seconds=0.5)
    loader = torch.utils.data.DataLoader(fresh, batch_size=2, collate_fn=collate, num_workers=2)
    batches = list(loader)
    assert sum(len(b["text"]) for b in batches) == 4 and fresh.skipped == 2
    # Every row unreadable: say so (not "50 audio files in a row" of a 2-row data set), with a type the CLI reports.
    all_broken = ManifestDataset(entries[1:3])
    with pytest.raises(UnreadableDataError, match="none of the 2 audio files of the data set can be read") as info:
        all_broken[0]
    assert "50" not in str(info.value)
    many = ManifestDataset(entries[1:3] * 30, check_files=False)
    with pytest.raises(UnreadableDataError, match="50 audio files in a row could not be read"):
        many[0]


# ---------------------------------------------------------------------------------------------------
# readers, each on a small folder in the data set's exact layout


def write_csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def test_esc50_reader(tmp_path, capsys):
    root = tmp_path / "ESC-50-master"
    rows = []
    for fold in range(1, 6):
        name = f"{fold}-100038-A-14.wav"
        write_tone(str(root / "audio" / name), seconds=5.0 if fold == 1 else 0.2)
        rows.append([name, fold, 14 + fold, "chirping_birds" if fold % 2 else "dog", "False", "100038", "A"])
    write_csv(str(root / "meta" / "esc50.csv"), ["filename", "fold", "target", "category", "esc10", "src_file", "take"],
              rows)
    entries = readers.esc50_entries(str(root))
    assert [e.split for e in entries] == ["train", "train", "train", "val", "test"]
    assert entries[0].labels == ["chirping birds"] and entries[1].labels == ["dog"]
    assert entries[0].path == str(root / "audio" / "1-100038-A-14.wav")
    one_round = readers.esc50_entries(str(root), fold_splits={1: "train", 2: "test"})
    assert [e.split for e in one_round] == ["train", "test"]
    ds = ManifestDataset(entries, split="train", mode="eval", clip_seconds=5.0)
    assert ds[0]["wave"].shape == (80000,) and ds.class_names == ["chirping birds", "dog"]
    readers.main(["esc50", str(root), str(tmp_path / "esc50.csv")])
    assert read_manifest(str(tmp_path / "esc50.csv")) == entries
    assert "wrote 5 rows" in capsys.readouterr().out
    readers.main(["esc50", str(root), str(tmp_path / "folds.csv"), "--folds"])  # for collat.evaluate --folds
    assert [e.split for e in read_manifest(str(tmp_path / "folds.csv"))] == [f"fold{k}" for k in range(1, 6)]
    with pytest.raises(SystemExit):
        readers.main(["fsd50k", str(root), str(tmp_path / "x.csv"), "--folds"])
    with pytest.raises(FileNotFoundError, match="meta/esc50.csv"):
        readers.esc50_entries(str(tmp_path))


def test_urbansound8k_reader(tmp_path):
    root = tmp_path / "UrbanSound8K"
    rows = []
    for fold, cls in ((1, "dog_bark"), (9, "street_music"), (10, "car_horn")):
        name = f"100032-3-0-{fold}.wav"
        write_tone(str(root / "audio" / f"fold{fold}" / name), sample_rate=44100, channels=2)
        rows.append([name, 100032, 0.0, 0.3, 1, fold, 3, cls])
    write_csv(str(root / "metadata" / "UrbanSound8K.csv"),
              ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"], rows)
    entries = readers.urbansound8k_entries(str(root))
    assert [(e.split, e.labels) for e in entries] == [("train", ["dog bark"]), ("val", ["street music"]),
                                                      ("test", ["car horn"])]
    assert entries[1].path == str(root / "audio" / "fold9" / "100032-3-0-9.wav")
    assert ManifestDataset(entries, clip_seconds=None)[0]["wave"].shape == (8000,)  # 44.1 kHz stereo in


def test_fsd50k_reader(tmp_path):
    root = tmp_path / "FSD50K"
    truth = root / "FSD50K.ground_truth"
    write_csv(str(truth / "dev.csv"), ["fname", "labels", "mids", "split"], [
        [64760, "Electric_guitar,Guitar,Plucked_string_instrument,Music", "/m/02sgy,/m/0342h,/m/0fx80y,/m/04rlf",
         "train"],
        [16399, "Drawer_open_or_close,Cupboard_open_or_close,Domestic_sounds_and_home_sounds",
         "/m/0fqfqc,/m/0642b4,/t/dd00071", "val"]])
    write_csv(str(truth / "eval.csv"), ["fname", "labels", "mids"], [[37199, "Walk_and_footsteps", "/m/07pbtc8"]])
    for folder, fname in (("FSD50K.dev_audio", 64760), ("FSD50K.dev_audio", 16399), ("FSD50K.eval_audio", 37199)):
        write_tone(str(root / folder / f"{fname}.wav"), sample_rate=44100)
    entries = readers.fsd50k_entries(str(root))
    assert [e.split for e in entries] == ["train", "val", "test"]
    assert entries[0].labels == ["Electric guitar", "Guitar", "Plucked string instrument", "Music"]
    assert entries[2].labels == ["Walk and footsteps"]
    assert entries[2].path == str(root / "FSD50K.eval_audio" / "37199.wav")
    ds = ManifestDataset(entries, split="train", mode="eval", clip_seconds=1.0)
    assert int(ds[0]["labels"].sum()) == 4


def write_audioset(root):
    header = ["# Segments csv created Sun Mar  5 10:54:31 2017",
              "# num_ytids=4, num_segs=4, num_unique_labels=3, num_positive_labels=5",
              "# YTID, start_seconds, end_seconds, positive_labels"]
    balanced = ['--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"',
                '-0RWZT-miFs, 420.000, 430.000, "/m/03v3yw"',
                'a_b-cdefghi, 0.000, 10.000, "/m/09x0r"',
                'gone1234567, 10.000, 20.000, "/m/09x0r"']
    evaluation = ['--4gqARaEJE, 0.000, 10.000, "/m/03v3yw,/t/dd00088"']
    os.makedirs(root, exist_ok=True)
    (root / "balanced_train_segments.csv").write_text("\n".join(header + balanced) + "\n")
    (root / "eval_segments.csv").write_text("\n".join(header + evaluation) + "\n")
    write_csv(str(root / "class_labels_indices.csv"), ["index", "mid", "display_name"],
              [[0, "/m/09x0r", "Speech"], [1, "/t/dd00088", "Child speech, kid speaking"],
               [2, "/m/03v3yw", "Keys jangling"]])
    clips = root / "clips"
    write_tone(str(clips / "--PJHxphWEs_30.000.wav"))
    write_tone(str(clips / "sub" / "Y-0RWZT-miFs.flac"))
    write_tone(str(clips / "a_b-cdefghi_0_10.wav"))
    write_tone(str(clips / "--4gqARaEJE.wav"))


def test_audioset_reader(tmp_path, capsys):
    root = tmp_path / "audioset"
    write_audioset(root)
    entries = readers.audioset_entries(str(root), clips_dir=str(root / "clips"))
    found = {os.path.basename(e.path): (e.labels, e.split) for e in entries}
    assert found == {
        "--PJHxphWEs_30.000.wav": (["Speech", "Child speech, kid speaking"], "train"),
        "Y-0RWZT-miFs.flac": (["Keys jangling"], "train"),
        "a_b-cdefghi_0_10.wav": (["Speech"], "train"),
        "--4gqARaEJE.wav": (["Keys jangling", "Child speech, kid speaking"], "test"),
    }
    err = capsys.readouterr().err
    assert "balanced_train_segments.csv: 3 of 4 segments have a clip" in err and "(1 left out)" in err
    assert "eval_segments.csv: 1 of 1" in err
    manifest = write_manifest(entries, str(tmp_path / "audioset.csv"))
    ds = ManifestDataset(manifest, split="test", clip_seconds=1.0)
    assert ds[0]["text"] == "This is a sound of Child speech, kid speaking and Keys jangling"
    with pytest.raises(FileNotFoundError, match="segment CSVs"):
        readers.audioset_entries(str(root), segment_splits={"unbalanced_train_segments.csv": "train"})


def test_audioset_unknown_label_id_is_an_error(tmp_path):
    root = tmp_path / "audioset"
    write_audioset(root)
    with open(root / "eval_segments.csv", "a") as handle:
        handle.write('zzzzzzzzzzz, 0.000, 10.000, "/m/nothere"\n')
    with pytest.raises(ValueError, match="/m/nothere"):
        readers.audioset_entries(str(root), clips_dir=str(root / "clips"), verbose=False)


def test_reader_output_is_a_valid_jsonl_manifest(tmp_path):
    root = tmp_path / "audioset"
    write_audioset(root)
    readers.main(["audioset", str(root), str(tmp_path / "a.jsonl"), "--clips", str(root / "clips")])
    rows = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    assert len(rows) == 4 and all(not os.path.isabs(row["path"]) for row in rows)
    assert read_manifest(str(tmp_path / "a.jsonl"))[0].labels == ["Speech", "Child speech, kid speaking"]


# ---------------------------------------------------------------------------------------------------
# issue 17: BOM manifests, labels with spaces, headers that claim more audio than is needed


@pytest.mark.parametrize("extension", ["csv", "jsonl"])
def test_manifest_with_a_byte_order_mark(tmp_path, extension):
    clip = write_tone(str(tmp_path / "a.wav"))
    text = ("path,labels,split\na.wav,dog,train\n" if extension == "csv"
            else '{"path": "a.wav", "labels": ["dog"], "split": "train"}\n')
    path = tmp_path / f"excel.{extension}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # what Excel's "CSV UTF-8" writes
    (entry,) = read_manifest(str(path))
    assert entry == ManifestEntry(clip, ["dog"], [], "train")


def test_csv_labels_and_fields_are_stripped(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,labels,caption,split\n a.wav ,Speech; Music ;; Dog barking ,, test \n")
    (entry,) = read_manifest(str(path))
    assert entry.labels == ["Speech", "Music", "Dog barking"]
    assert entry.path == str(tmp_path / "a.wav") and entry.split == "test"


def write_lying_wav(path, claimed_seconds, sample_rate=16000, real_seconds=1.0):
    """A 16-bit mono WAV whose header claims `claimed_seconds`: a ramp for `real_seconds`, then a sparse
    (unallocated) tail of zeros up to the claimed size, as a crafted or truncated-and-extended file has."""
    frames = int(real_seconds * sample_rate)
    soundfile.write(path, np.linspace(-0.5, 0.5, frames), sample_rate, subtype="PCM_16")
    claimed = int(claimed_seconds * sample_rate)
    with open(path, "r+b") as handle:
        handle.seek(4)
        handle.write((36 + 2 * claimed).to_bytes(4, "little"))
        handle.seek(40)
        handle.write((2 * claimed).to_bytes(4, "little"))
        handle.truncate(44 + 2 * claimed)  # sparse: no disk blocks for the tail
    return path


class CountingReads:
    """Counts the frames soundfile decodes (SoundFile.read), and the peak of Python-tracked memory."""

    def __init__(self, monkeypatch):
        self.frames = 0
        original = soundfile.SoundFile.read

        def read(handle, frames=-1, *args, **kwargs):
            data = original(handle, frames, *args, **kwargs)
            self.frames += len(data)
            return data

        monkeypatch.setattr(soundfile.SoundFile, "read", read)


@pytest.mark.parametrize("mode, crop", [("eval", "start"), ("eval", "center"), ("train", "start")])
def test_a_header_claiming_an_hour_reads_only_the_window(tmp_path, monkeypatch, mode, crop):
    import tracemalloc

    path = write_lying_wav(str(tmp_path / "hour.wav"), claimed_seconds=3600)
    assert soundfile.info(path).frames == 3600 * 16000
    counter = CountingReads(monkeypatch)
    tracemalloc.start()
    wave = load_audio(path, 16000, clip_seconds=0.5, mode=mode, rng=np.random.default_rng(0), crop=crop)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert wave.shape == (8000,)
    assert counter.frames == 8000  # the window only, not 57.6 M frames (230 MB as float32)
    assert peak < 2_000_000, peak
    if crop == "center":  # the middle of the claimed hour (the sparse zeros)
        assert not wave.any()


def test_windowed_reads_equal_cropping_the_whole_file(tmp_path):
    """The crop of a window read equals resampling and cropping the whole file (44.1 kHz -> 16 kHz), for
    every crop; the train offset comes from the same rng draw on the resampled length."""
    rng = np.random.default_rng(5)
    data = (0.3 * rng.standard_normal(44100 * 2)).astype(np.float32)
    path = str(tmp_path / "noise.wav")
    soundfile.write(path, data, 44100, subtype="FLOAT")
    whole = torchaudio.functional.resample(torch.from_numpy(data), 44100, 16000)
    n, excess = 4000, whole.shape[0] - 4000
    expected = {("eval", "start"): 0, ("eval", "center"): excess // 2}
    for seed in range(4):
        expected[("train", seed)] = int(np.random.default_rng(seed).integers(0, excess + 1))
    for (mode, how), offset in expected.items():
        kwargs = {"crop": how} if mode == "eval" else {"rng": np.random.default_rng(how)}
        got = load_audio(path, 16000, clip_seconds=0.25, mode=mode, **kwargs)
        torch.testing.assert_close(got, whole[offset : offset + n], rtol=0, atol=1e-6)
