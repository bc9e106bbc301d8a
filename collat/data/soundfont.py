"""The embedded default data set: real sampled instruments and sound effects from a GM soundfont.

Clips mix 1-3 sources drawn from a list of General MIDI programs and GM percussion sounds named with
plain words, rendered through pyfluidsynth (it needs only the shared library libfluidsynth3, no audio
driver and no `fluidsynth` program) from Debian's FluidR3_GM.sf2. Each item is a pure function of
(seed, split, index): the random choices come from a seed stream of their own, and the synthesizer is
brought to the same state before every source (see `_Renderer`), so items are bit-identical whatever
the access order and whichever worker process renders them.

    ds = SoundfontDataset("train", size=4096)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, collate_fn=collate, num_workers=2)  # data.collate
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np
import torch

from collat.data.gm_sounds import CLASS_BY_NAME, CLASSES, SEEN_CLASSES, SoundClass
from collat.prompts import class_prompts, make_prompt

DEFAULT_SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
SOUNDFONT_ENV = "COLLAT_SOUNDFONT"
INSTALL_HINT = "apt-get install fluid-soundfont-gm libfluidsynth3"

# FluidSynth renders in blocks of 64 frames and applies note events at block boundaries. Every
# event time and every rendered length is a whole number of blocks, so a note never lands in the
# middle of a block left over from an earlier render.
BLOCK = 64
SPLITS = ("train", "val", "test")
PERCUSSION_CHANNEL = 9
PERCUSSION_BANK = 128
PEAK_LEVEL = 0.9  # the mixed clip is scaled so max |wave| == PEAK_LEVEL
# Rendering variety (training data only): velocity shift, note-length scale, detune, vibrato.
VARIETY_STREAM = 1  # extra seed word of the variety draws: the base draws of an item do not change
VARIETY_VELOCITY_SHIFT = (-40, 7)
VARIETY_MIN_VELOCITY = 40
VARIETY_LENGTH_SCALE = (0.6, 1.5)
VARIETY_DETUNE_CENTS = 40.0
VARIETY_MAX_VIBRATO = 100
SILENCE_PEAK = 1e-3  # a source whose peak stays below this was not rendered: an error, not a label
FLUSH_NOTES = 16  # piano notes of 1-2 voices each; a source holds at most ~6 voices at once
FLUSH_LOW_KEY = 36


def find_soundfont(path: str | None = None) -> str:
    """The soundfont file: `path` if given, else $COLLAT_SOUNDFONT, else Debian's FluidR3_GM.sf2."""
    if path is not None:
        source = "the soundfont argument"
    elif os.environ.get(SOUNDFONT_ENV):
        path, source = os.environ[SOUNDFONT_ENV], f"${SOUNDFONT_ENV}"
    else:
        path, source = DEFAULT_SOUNDFONT, "the default location"
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"soundfont not found: {path} (from {source}). The embedded data set renders real instrument "
            f"samples from the FluidR3 GM soundfont; install it with `{INSTALL_HINT}` (Debian/Ubuntu), "
            f"or point ${SOUNDFONT_ENV} or soundfont= at any General MIDI .sf2 file."
        )
    return path


# ---------------------------------------------------------------------------------------------------
# Clip specification: every random choice of one item, drawn before anything is rendered.


@dataclass(frozen=True)
class Note:
    key: int
    velocity: int
    start: int  # frames from the source's onset, a multiple of BLOCK
    length: int  # frames held, a multiple of BLOCK


@dataclass(frozen=True)
class SourceSpec:
    name: str
    onset: int  # frames from the start of the clip, a multiple of BLOCK
    notes: tuple[Note, ...]
    gain: float  # the source is scaled to this peak before mixing
    bend: int = 0  # pitch-wheel offset (2048 = one semitone); rendering variety only
    vibrato: int = 0  # modulation wheel, CC 1 (0-127): vibrato depth; rendering variety only


@dataclass(frozen=True)
class ClipSpec:
    sources: tuple[SourceSpec, ...]
    names: tuple[str, ...]  # in prompt order
    num_frames: int
    sample_rate: int


def _blocks(seconds: float, sample_rate: int) -> int:
    return max(1, int(round(seconds * sample_rate / BLOCK)))


def _draw_notes(rng: np.random.Generator, cls: SoundClass, sample_rate: int) -> list[Note]:
    notes, start = [], 0
    for _ in range(int(rng.integers(1, cls.max_notes + 1))):
        key = int(rng.integers(cls.low, cls.high + 1))
        length = _blocks(rng.uniform(cls.min_seconds, cls.max_seconds), sample_rate) * BLOCK
        notes.append(Note(key, int(rng.integers(70, 121)), start, length))
        # Percussion hits leave a gap for the hit to ring; melodic notes follow each other legato.
        gap = _blocks(rng.uniform(0.05, 0.4), sample_rate) * BLOCK if cls.percussion else 0
        start += length + gap
    return notes


def draw_clip(rng: np.random.Generator, class_names: list[str], sources: tuple[int, int],
              num_frames: int, sample_rate: int, shuffle_labels: bool) -> ClipSpec:
    """All random choices of one clip: which classes, their notes, onsets and levels, prompt order."""
    count = int(rng.integers(sources[0], sources[1] + 1))
    picked = sorted(rng.choice(len(class_names), size=count, replace=False).tolist())
    total_blocks = num_frames // BLOCK
    # A source starts early enough to sound for at least ~1 s (or half the clip, if shorter).
    latest_onset = max(0, total_blocks - _blocks(min(1.0, num_frames / sample_rate / 2), sample_rate))
    specs = []
    for index in picked:
        cls = CLASS_BY_NAME[class_names[index]]
        onset = int(rng.integers(0, latest_onset + 1)) * BLOCK
        notes = tuple(_draw_notes(rng, cls, sample_rate))
        specs.append(SourceSpec(cls.name, onset, notes, float(rng.uniform(0.5, 1.0))))
    order = rng.permutation(count).tolist() if shuffle_labels else list(range(count))
    names = tuple(class_names[picked[k]] for k in order)
    return ClipSpec(tuple(specs), names, num_frames, sample_rate)


def vary_clip(spec: ClipSpec, rng: np.random.Generator) -> ClipSpec:
    """Rendering variety the synthesizer gives for free, drawn from a stream of its own so the base
    choices stay those of the plain data set: softer and louder playing (velocity, which also picks the
    soundfont's velocity layer and filter), detune up to +-VARIETY_DETUNE_CENTS, vibrato depth, and notes
    played shorter or longer. Reverb and chorus stay off: their tails would leak from clip to clip."""
    sources = []
    for source in spec.sources:
        scale = float(rng.uniform(*VARIETY_LENGTH_SCALE))
        shift = int(rng.integers(*VARIETY_VELOCITY_SHIFT, endpoint=True))
        notes, start = [], 0
        for k, note in enumerate(source.notes):  # lengths and the gaps between hits scale alike
            length = _scaled_frames(note.length, scale, spec.sample_rate)
            velocity = int(np.clip(note.velocity + shift, VARIETY_MIN_VELOCITY, 127))
            notes.append(Note(note.key, velocity, start, length))
            if k + 1 < len(source.notes):
                gap = source.notes[k + 1].start - note.start - note.length
                start += length + (_scaled_frames(gap, scale, spec.sample_rate) if gap > 0 else 0)
        bend = int(round(rng.uniform(-1, 1) * VARIETY_DETUNE_CENTS / 100 * 2048))
        vibrato = int(rng.integers(0, VARIETY_MAX_VIBRATO, endpoint=True))
        sources.append(SourceSpec(source.name, source.onset, tuple(notes), source.gain, bend, vibrato))
    return ClipSpec(tuple(sources), spec.names, spec.num_frames, spec.sample_rate)


def _scaled_frames(frames: int, scale: float, sample_rate: int) -> int:
    return _blocks(frames * scale / sample_rate, sample_rate) * BLOCK


# ---------------------------------------------------------------------------------------------------
# Rendering


class _Renderer:
    """One FluidSynth instance with the soundfont loaded, rendering one source at a time.

    Determinism: FluidSynth carries state from one note to the next (a voice slot's output gain
    ramps from where its previous voice left it, so the first frames of a note depend on history).
    Playing one fixed, near-silent "flush" chord on a spare channel after every source brings every
    slot a source can use back to the same state, so a source renders to the same bytes whatever was
    rendered before it, in this process or another.
    Reverb and chorus are off: their tails would leak from one clip into the next. Output is read as
    float (fluid_synth_write_float), not int16, to avoid quantisation and the int16 path's dither.
    """

    FLUSH_CHANNEL = 15

    def __init__(self, soundfont: str, sample_rate: int):
        try:
            import fluidsynth
        except ImportError as error:  # the Python package is there but libfluidsynth is not, or neither
            raise ImportError(
                f"pyfluidsynth could not load libfluidsynth ({error}); install it with `{INSTALL_HINT}` "
                "and `pip install pyfluidsynth`"
            ) from error
        self.sample_rate = sample_rate
        self.synth = fluidsynth.Synth(
            gain=1.0, samplerate=float(sample_rate),
            **{"synth.reverb.active": 0, "synth.chorus.active": 0, "synth.lock-memory": 0},
        )
        self.sfid = self.synth.sfload(soundfont)
        if self.sfid < 0:
            raise RuntimeError(f"FluidSynth could not load the soundfont {soundfont!r} (is it a valid .sf2 file?)")
        self._write_float = fluidsynth._fl.fluid_synth_write_float
        self._write_float.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                      ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        self._write_float.restype = ctypes.c_int
        self._flush()

    def _render(self, frames: int) -> np.ndarray:
        """`frames` frames of the synth's output, mixed down to mono float32."""
        left = np.empty(frames, dtype=np.float32)
        right = np.empty(frames, dtype=np.float32)
        if self._write_float(self.synth.synth, frames, left.ctypes.data, 0, 1, right.ctypes.data, 0, 1) != 0:
            raise RuntimeError("fluid_synth_write_float failed")
        left += right
        left *= np.float32(0.5)
        return left

    def _flush(self):
        # Each voice slot ramps its output gain from where its previous voice left it, so a slot's
        # history shows in the first frames of its next voice. Occupying the lowest FLUSH_NOTES
        # slots (FluidSynth allocates the lowest free slot) with one fixed chord resets them all.
        self.synth.program_select(self.FLUSH_CHANNEL, self.sfid, 0, 0)
        for key in range(FLUSH_LOW_KEY, FLUSH_LOW_KEY + FLUSH_NOTES):
            self.synth.noteon(self.FLUSH_CHANNEL, key, 1)
        self._render(BLOCK)
        self.synth.all_sounds_off(self.FLUSH_CHANNEL)
        self._render(BLOCK)

    def render_source(self, cls: SoundClass, notes: tuple[Note, ...], max_frames: int,
                      release_seconds: float = 0.5, bend: int = 0, vibrato: int = 0) -> np.ndarray:
        """The source alone, from its onset: at most `max_frames` frames, ending in a short fade.
        bend (pitch wheel) and vibrato (CC 1) are set for this source and put back to 0 after it."""
        channel = PERCUSSION_CHANNEL if cls.percussion else 0
        bank, program = (PERCUSSION_BANK, 0) if cls.percussion else (0, cls.program)
        if self.synth.program_select(channel, self.sfid, bank, program) != 0:
            raise RuntimeError(f"the soundfont has no preset bank={bank} program={program} for {cls.name!r}")
        varied = bool(bend or vibrato)
        if varied:
            self.synth.pitch_bend(channel, bend)
            self.synth.cc(channel, 1, vibrato)
        events = []
        for note in notes:
            events.append((note.start, 1, note))
            events.append((note.start + note.length, 0, note))
        events.sort(key=lambda e: (e[0], e[1]))  # note-offs before note-ons at the same time
        # Render whole blocks even when max_frames is not one (the synth must stay block-aligned), then cut.
        whole_blocks = -(-max_frames // BLOCK) * BLOCK
        end = min(max(e[0] for e in events) + _blocks(release_seconds, self.sample_rate) * BLOCK, whole_blocks)
        pieces, now = [], 0
        for time, is_on, note in events:
            if time >= end:
                break
            if time > now:
                pieces.append(self._render(time - now))
                now = time
            if is_on:
                self.synth.noteon(channel, note.key, note.velocity)
            else:
                self.synth.noteoff(channel, note.key)
        if end > now:
            pieces.append(self._render(end - now))
        self.synth.all_sounds_off(channel)
        if varied:  # back to the state every plain source starts from
            self.synth.pitch_bend(channel, 0)
            self.synth.cc(channel, 1, 0)
        self._render(BLOCK)
        self._flush()
        wave = np.concatenate(pieces)[:max_frames]
        fade = min(len(wave), self.sample_rate // 100)  # 10 ms: no click where the tail is cut
        wave[len(wave) - fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
        return wave


_RENDERERS: dict[tuple[str, int], tuple[int, _Renderer]] = {}


def get_renderer(soundfont: str, sample_rate: int) -> _Renderer:
    """This process's renderer for (soundfont, sample_rate), made on first use and again after fork."""
    key = (soundfont, sample_rate)
    entry = _RENDERERS.get(key)
    if entry is None or entry[0] != os.getpid():
        # A synth inherited through fork is left alone: freeing it could touch the parent's state.
        _RENDERERS[key] = (os.getpid(), _Renderer(soundfont, sample_rate))
    return _RENDERERS[key][1]


def render_clip(spec: ClipSpec, renderer: _Renderer) -> tuple[np.ndarray, list[np.ndarray]]:
    """The mixed clip (peak PEAK_LEVEL, or all zeros without sources) and each source placed alone.

    Each returned source is already scaled to its place in the mix: the clip is their sum times the
    one normalisation factor.
    """
    placed = []
    for source in spec.sources:
        alone = renderer.render_source(CLASS_BY_NAME[source.name], source.notes, spec.num_frames - source.onset,
                                       bend=source.bend, vibrato=source.vibrato)
        peak = float(np.abs(alone).max())
        if peak < SILENCE_PEAK:
            raise RuntimeError(
                f"source {source.name!r} rendered silent (peak {peak:.2e}) with notes {source.notes}; "
                "is the soundfont a complete General MIDI set?"
            )
        track = np.zeros(spec.num_frames, dtype=np.float32)
        track[source.onset:source.onset + len(alone)] = alone * np.float32(source.gain / peak)
        placed.append(track)
    mix = np.sum(placed, axis=0, dtype=np.float32) if placed else np.zeros(spec.num_frames, np.float32)
    peak = float(np.abs(mix).max())
    scale = np.float32(PEAK_LEVEL / peak) if peak > 0 else np.float32(0.0)
    return mix * scale, [track * scale for track in placed]


# ---------------------------------------------------------------------------------------------------
# Data set


class SoundfontDataset(torch.utils.data.Dataset):
    """Clips of 1-3 mixed GM sources with multi-hot labels and a prompt; see the module docstring.

    Item i is a pure function of (seed, split, i): its random choices come from
    `np.random.default_rng([seed, split_index, i])`, so splits draw from distinct streams and never
    share clips. `shuffle_labels` (default: True for "train" only) shuffles the class order of the
    prompt; otherwise classes appear in `class_names` order. With `cache=True` rendered items are
    kept in memory (per process; about 256 KiB per 4 s clip at 16 kHz). `variety=True` adds the
    rendering variety of `vary_clip`, drawn from `np.random.default_rng([seed, split_index, i,
    VARIETY_STREAM])`: items stay pure functions of (seed, split, i), and their classes, keys, onsets and
    prompts are those of the plain data set.
    """

    def __init__(self, split: str = "train", size: int = 1024, seed: int = 0, classes: list[str] | None = None,
                 sources: tuple[int, int] = (1, 3), clip_seconds: float = 4.0, sample_rate: int = 16000,
                 soundfont: str | None = None, shuffle_labels: bool | None = None, cache: bool = False,
                 variety: bool = False):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be an int >= 0, got {size!r}")
        classes = list(SEEN_CLASSES if classes is None else classes)
        unknown = [name for name in classes if name not in CLASS_BY_NAME]
        if unknown:
            raise ValueError(f"classes: unknown class names {unknown}; known names are {[c.name for c in CLASSES]}")
        if not classes or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be a non-empty list of distinct names, got {classes}")
        low, high = sources
        if not (1 <= low <= high <= len(classes)):
            raise ValueError(f"sources must be (min, max) with 1 <= min <= max <= {len(classes)} (the number of "
                             f"classes), got {sources}")
        num_frames = clip_seconds * sample_rate
        if sample_rate <= 0 or num_frames < BLOCK or abs(num_frames - round(num_frames)) > 1e-6:
            raise ValueError(
                f"clip_seconds * sample_rate must be a whole number of frames >= {BLOCK}, got "
                f"clip_seconds={clip_seconds}, sample_rate={sample_rate}"
            )
        self.split = split
        self.size = size
        self.seed = seed
        self.class_names = classes
        self.sources = (int(low), int(high))
        self.clip_seconds = clip_seconds
        self.sample_rate = int(sample_rate)
        self.num_frames = int(round(num_frames))
        self.soundfont = find_soundfont(soundfont)
        self.shuffle_labels = (split == "train") if shuffle_labels is None else bool(shuffle_labels)
        self.cache = {} if cache else None
        self.variety = bool(variety)

    def __len__(self) -> int:
        return self.size

    def spec(self, index: int) -> ClipSpec:
        """Every random choice of item `index` (classes, notes, onsets, levels, prompt order)."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a data set of size {self.size}")
        key = [self.seed, SPLITS.index(self.split), index]
        spec = draw_clip(np.random.default_rng(key), self.class_names, self.sources, self.num_frames, self.sample_rate,
                         self.shuffle_labels)
        return vary_clip(spec, np.random.default_rng(key + [VARIETY_STREAM])) if self.variety else spec

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            index += self.size
        if self.cache is not None and index in self.cache:
            return dict(self.cache[index])
        spec = self.spec(index)
        wave, _ = render_clip(spec, get_renderer(self.soundfont, self.sample_rate))
        labels = torch.zeros(len(self.class_names), dtype=torch.float32)
        labels[[self.class_names.index(name) for name in spec.names]] = 1.0
        item = {"wave": torch.from_numpy(wave), "labels": labels, "text": make_prompt(list(spec.names)),
                "names": list(spec.names)}
        if self.cache is not None:
            self.cache[index] = item
            return dict(item)
        return item

    def prompts(self) -> list[str]:
        """The single-class prompt of every class, in `class_names` order (zero-shot classification)."""
        return class_prompts(self.class_names)
