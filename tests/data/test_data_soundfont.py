"""The embedded soundfont data set: determinism, splits, labels that match the audio, prompts."""
import hashlib
import os

import numpy as np
import pytest
import torch

from collat.data import soundfont as sf
from collat.data.collate import collate
from collat.data.gm_sounds import CLASSES, HELDOUT_CLASSES, SEEN_CLASSES
from collat.data.soundfont import (
    PEAK_LEVEL,
    ClipSpec,
    Note,
    SoundfontDataset,
    find_soundfont,
    get_renderer,
    render_clip,
)
from collat.prompts import make_prompt

pytestmark = pytest.mark.skipif(not os.path.isfile(sf.DEFAULT_SOUNDFONT) and not os.environ.get(sf.SOUNDFONT_ENV),
                                reason="needs the FluidR3 GM soundfont (apt-get install fluid-soundfont-gm)")


def digest(wave: torch.Tensor) -> str:
    return hashlib.sha1(wave.numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def all_classes_train():
    return SoundfontDataset("train", size=64, seed=11, classes=[c.name for c in CLASSES])


def test_make_prompt_follows_the_paper_template():
    assert make_prompt(["violin"]) == "This is a sound of violin"
    assert make_prompt(["violin", "snare drum"]) == "This is a sound of violin and snare drum"
    assert make_prompt(["a", "b", "c"]) == "This is a sound of a, b, and c"
    assert make_prompt(["a", "b", "c", "d"]) == "This is a sound of a, b, c, and d"
    with pytest.raises(ValueError, match="empty"):
        make_prompt([])
    with pytest.raises(TypeError, match="list"):
        make_prompt("violin")


def test_class_lists():
    names = [c.name for c in CLASSES]
    assert len(names) == len(set(names)) == 36
    assert len(SEEN_CLASSES) == 30 and len(HELDOUT_CLASSES) == 6
    assert not set(SEEN_CLASSES) & set(HELDOUT_CLASSES)
    assert set(SEEN_CLASSES) | set(HELDOUT_CLASSES) == set(names)
    for c in CLASSES:
        assert 0 <= c.low <= c.high <= 127 and 0 <= c.program <= 127, c
        assert c.name == c.name.lower().strip() and "_" not in c.name
        if c.percussion:
            assert c.low == c.high == c.key
    assert {"violin", "church organ", "bird tweet", "telephone ring", "snare drum"} <= set(names)


def test_missing_soundfont_is_a_clear_error(tmp_path, monkeypatch):
    missing = str(tmp_path / "none.sf2")
    with pytest.raises(FileNotFoundError, match="apt-get install fluid-soundfont-gm libfluidsynth3"):
        find_soundfont(missing)
    monkeypatch.setenv(sf.SOUNDFONT_ENV, missing)
    with pytest.raises(FileNotFoundError, match=r"none\.sf2.*COLLAT_SOUNDFONT"):
        find_soundfont()
    with pytest.raises(FileNotFoundError, match="fluid-soundfont-gm"):
        SoundfontDataset(size=4)
    monkeypatch.setenv(sf.SOUNDFONT_ENV, sf.DEFAULT_SOUNDFONT)
    assert find_soundfont() == sf.DEFAULT_SOUNDFONT


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="split"):
        SoundfontDataset("dev")
    with pytest.raises(ValueError, match="unknown class names.*'kazoo'"):
        SoundfontDataset(classes=["violin", "kazoo"])
    with pytest.raises(ValueError, match="sources"):
        SoundfontDataset(sources=(0, 2))
    with pytest.raises(ValueError, match="sources"):
        SoundfontDataset(sources=(3, 2))
    with pytest.raises(ValueError, match="whole number of frames"):
        SoundfontDataset(clip_seconds=0.00001)
    with pytest.raises(IndexError):
        SoundfontDataset(size=3)[3]


def test_item_format():
    ds = SoundfontDataset("val", size=6, seed=1)
    assert ds.class_names == SEEN_CLASSES and len(ds) == 6
    for i in range(len(ds)):
        item = ds[i]
        wave, labels = item["wave"], item["labels"]
        assert wave.dtype == torch.float32 and wave.shape == (64000,)
        assert abs(wave.abs().max().item() - PEAK_LEVEL) < 1e-6  # peak-normalised, never clipping
        assert labels.dtype == torch.float32 and labels.shape == (30,)
        assert set(labels.unique().tolist()) <= {0.0, 1.0} and 1 <= labels.sum() <= 3
        assert set(item["names"]) == {ds.class_names[k] for k in labels.nonzero().flatten().tolist()}
        assert item["text"] == make_prompt(item["names"])
        # Outside training the prompt lists classes in class_names order.
        assert item["names"] == sorted(item["names"], key=ds.class_names.index)


def test_same_bytes_in_any_order_in_any_process():
    ds = SoundfontDataset("train", size=24, seed=5)
    forward = [digest(ds[i]["wave"]) for i in range(len(ds))]
    backward = [digest(ds[i]["wave"]) for i in reversed(range(len(ds)))][::-1]
    assert forward == backward
    sf._RENDERERS.clear()  # a fresh synthesizer, as a new worker process would have
    again = SoundfontDataset("train", size=24, seed=5)
    assert [digest(again[i]["wave"]) for i in (7, 3, 19, 0)] == [forward[i] for i in (7, 3, 19, 0)]
    assert again[4]["text"] == ds[4]["text"]
    other_seed = SoundfontDataset("train", size=24, seed=6)
    assert digest(other_seed[0]["wave"]) != forward[0]


def test_deterministic_when_the_clip_is_not_whole_synth_blocks():
    ds = SoundfontDataset("val", size=6, seed=3, sample_rate=22050, clip_seconds=1.0)  # 22050 = 344.5 blocks
    forward = [digest(ds[i]["wave"]) for i in range(len(ds))]
    assert ds[0]["wave"].shape == (22050,)
    assert [digest(ds[i]["wave"]) for i in reversed(range(len(ds)))][::-1] == forward


def test_dataloader_workers_give_the_same_batches():
    ds = SoundfontDataset("test", size=8, seed=2)
    ds[0]  # the parent holds a synth when the workers fork: they must make their own
    serial = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate, num_workers=0)))
    parallel = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate, num_workers=2)))
    assert torch.equal(serial["wave"], parallel["wave"]) and torch.equal(serial["labels"], parallel["labels"])
    assert serial["text"] == parallel["text"] and serial["names"] == parallel["names"]


def test_splits_never_share_clips():
    digests = {}
    for split in ("train", "val", "test"):
        ds = SoundfontDataset(split, size=12, seed=0)
        digests[split] = {digest(ds[i]["wave"]) for i in range(len(ds))}
        assert len(digests[split]) == 12
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]


def test_heldout_classes_never_in_training():
    ds = SoundfontDataset("train", size=400, seed=0)
    used = set()
    for i in range(len(ds)):
        used.update(ds.spec(i).names)  # the random draw only; rendering is not needed here
    assert used <= set(SEEN_CLASSES) and not used & set(HELDOUT_CLASSES)
    assert len(used) == 30  # and every seen class does occur
    heldout = SoundfontDataset("test", size=20, classes=HELDOUT_CLASSES, sources=(1, 1))
    assert heldout.class_names == HELDOUT_CLASSES
    assert all(len(heldout.spec(i).names) == 1 for i in range(len(heldout)))


def test_sources_per_clip_and_prompt_order():
    counts = [len(SoundfontDataset("train", size=200, sources=(2, 3)).spec(i).sources) for i in range(200)]
    assert set(counts) == {2, 3}
    train = SoundfontDataset("train", size=100, sources=(3, 3))
    val = SoundfontDataset("val", size=100, sources=(3, 3))
    in_order = [list(train.spec(i).names) == sorted(train.spec(i).names, key=train.class_names.index)
                for i in range(100)]
    assert 0 < sum(in_order) < 100  # training shuffles the label order of the prompt
    assert all(list(val.spec(i).names) == sorted(val.spec(i).names, key=val.class_names.index) for i in range(100))
    assert not SoundfontDataset("train", shuffle_labels=False).shuffle_labels


def test_every_class_renders_sound_and_nothing_renders_silence():
    renderer = get_renderer(find_soundfont(), 16000)
    for cls in CLASSES:
        for key in {cls.low, cls.high, (cls.low + cls.high) // 2}:
            wave = renderer.render_source(cls, (Note(key, 100, 0, 64 * 100),), 16000)
            assert np.abs(wave).max() > 2e-3, (cls.name, key)
    silent, tracks = render_clip(ClipSpec((), (), 4096, 16000), renderer)
    assert tracks == [] and not silent.any()


def test_labels_match_what_was_rendered(all_classes_train):
    ds = all_classes_train
    renderer = get_renderer(ds.soundfont, ds.sample_rate)
    for i in range(16):
        spec, item = ds.spec(i), ds[i]
        wave = item["wave"].numpy()
        mixed, tracks = render_clip(spec, renderer)
        assert np.array_equal(mixed, wave)
        # The multi-hot is exactly the set of sources mixed, and each source is audible on its own.
        assert {s.name for s in spec.sources} == set(item["names"]) == set(spec.names)
        assert len(spec.sources) == len(set(item["names"])) == int(item["labels"].sum())
        np.testing.assert_allclose(np.sum(tracks, axis=0), wave, atol=1e-6)
        for source, track in zip(spec.sources, tracks):
            assert not track[:source.onset].any()  # nothing before the source starts
            assert np.abs(track[source.onset:]).max() > 0.05 * PEAK_LEVEL, source.name
        first_onset = min(s.onset for s in spec.sources)
        assert not wave[:first_onset].any() and np.abs(wave[first_onset:]).max() > 0


def test_cache_returns_equal_items():
    ds = SoundfontDataset("val", size=3, cache=True)
    first = ds[1]
    assert 1 in ds.cache
    second = ds[1]
    assert torch.equal(first["wave"], second["wave"]) and first["text"] == second["text"]
    assert torch.equal(first["wave"], SoundfontDataset("val", size=3)[1]["wave"])


def test_collate_shapes():
    ds = SoundfontDataset("train", size=4, classes=SEEN_CLASSES[:5], clip_seconds=1.0)
    batch = collate([ds[i] for i in range(4)])
    assert batch["wave"].shape == (4, 16000) and batch["labels"].shape == (4, 5)
    assert len(batch["text"]) == 4 and all(isinstance(n, list) for n in batch["names"])
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_rendering_variety_is_pure_and_leaves_plain_items_alone():
    """variety=True: each item is still a pure function of (seed, split, index) in any order; classes,
    onsets and prompt are the plain item's; and a varied source leaves the synthesizer as a plain source
    expects it (plain items rendered after varied ones are bit-identical to a fresh process's)."""
    plain = SoundfontDataset("train", size=12, seed=4)
    varied = SoundfontDataset("train", size=12, seed=4, variety=True)
    sf._RENDERERS.clear()
    fresh_plain = [digest(plain[i]["wave"]) for i in range(12)]
    forward = [digest(varied[i]["wave"]) for i in range(12)]  # varied renders in the same synthesizer...
    assert [digest(plain[i]["wave"]) for i in range(12)] == fresh_plain  # ...leave plain renders unchanged
    assert [digest(varied[i]["wave"]) for i in reversed(range(12))][::-1] == forward
    sf._RENDERERS.clear()
    assert [digest(varied[i]["wave"]) for i in (5, 0, 9)] == [forward[i] for i in (5, 0, 9)]
    assert sum(a != b for a, b in zip(forward, fresh_plain)) == 12
    for i in range(12):
        base, spec = plain.spec(i), varied.spec(i)
        assert spec.names == base.names and varied[i]["text"] == plain[i]["text"]
        assert [s.onset for s in spec.sources] == [s.onset for s in base.sources]
        for s, b in zip(spec.sources, base.sources):
            assert [n.key for n in s.notes] == [n.key for n in b.notes]
            assert all(sf.VARIETY_MIN_VELOCITY <= n.velocity <= 127 and n.length % sf.BLOCK == 0 for n in s.notes)
            assert abs(s.bend) <= 2048 * sf.VARIETY_DETUNE_CENTS / 100 and 0 <= s.vibrato <= sf.VARIETY_MAX_VIBRATO
    varied_specs = [varied.spec(i) for i in range(12)]
    assert any(s.bend != 0 for spec in varied_specs for s in spec.sources)
    assert any(n.velocity < 70 for spec in varied_specs for s in spec.sources for n in s.notes)  # softer than plain


def test_rendering_variety_renders_every_class():
    classes = [c.name for c in CLASSES]
    varied = SoundfontDataset("train", size=72, seed=12, classes=classes, sources=(1, 1), variety=True)
    rendered = {varied[i]["names"][0] for i in range(72)}  # a silent source would raise
    assert len(rendered) > 25
