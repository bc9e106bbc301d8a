"""The classes of the embedded data set: General MIDI programs and GM percussion sounds named with
plain words, each with the key range and note lengths its clips are drawn from."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SoundClass:
    """One class: a GM program (bank 0) or a GM percussion key (bank 128, channel 10).

    `low`..`high` is the MIDI key range the notes are drawn from (one key for percussion). A source
    plays 1..`max_notes` notes in a row, each held for `min_seconds`..`max_seconds`.
    """

    name: str
    program: int
    percussion: bool = False
    low: int = 48
    high: int = 84
    max_notes: int = 3
    min_seconds: float = 0.25
    max_seconds: float = 1.2

    @property
    def key(self) -> int:
        """The percussion key (GM drum map), for percussion classes."""
        return self.low


def _melodic(name, program, low, high, max_notes=3, min_seconds=0.25, max_seconds=1.2):
    return SoundClass(name, program, False, low, high, max_notes, min_seconds, max_seconds)


def _effect(name, program, low=52, high=72):
    # Looped sound effects sound for as long as the key is held: one long note.
    return SoundClass(name, program, False, low, high, 1, 0.8, 2.5)


def _drum(name, key, max_hits=4):
    return SoundClass(name, 0, True, key, key, max_hits, 0.1, 0.35)


# Key ranges lie inside each instrument's playing range, and inside the range where FluidR3 has
# audible samples (checked key by key and at velocities 70, 95, 120, at 16 kHz).
CLASSES: list[SoundClass] = [
    _melodic("piano", 0, 36, 96),
    _melodic("harpsichord", 6, 41, 89),
    _melodic("glockenspiel", 9, 72, 103),
    _melodic("xylophone", 13, 65, 96),
    _melodic("church organ", 19, 36, 84),
    _melodic("accordion", 21, 53, 89),
    _melodic("harmonica", 22, 60, 84),
    _melodic("acoustic guitar", 24, 40, 76),
    _melodic("electric guitar", 30, 40, 79),
    _melodic("bass guitar", 33, 28, 55),
    _melodic("violin", 40, 55, 93),  # FluidR3 has no violin sample at key 94
    _melodic("cello", 42, 36, 72),
    _melodic("harp", 46, 36, 96),
    _melodic("choir", 52, 48, 79),
    _melodic("trumpet", 56, 54, 82),
    _melodic("trombone", 57, 40, 72),
    _melodic("tuba", 58, 28, 58),
    _melodic("saxophone", 65, 49, 80),
    _melodic("clarinet", 71, 50, 91),
    _melodic("flute", 73, 60, 96),
    _melodic("sitar", 104, 48, 79),
    _melodic("banjo", 105, 48, 84),
    _effect("seashore", 122),
    _effect("bird tweet", 123, 60, 84),
    _effect("telephone ring", 124, 60, 76),
    _effect("helicopter", 125),
    _effect("applause", 126),
    _effect("gunshot", 127, 48, 72),
    _drum("bass drum", 36),
    _drum("snare drum", 38),
    _drum("hand clap", 39),
    _drum("hi-hat", 42),
    _drum("cymbal", 49, max_hits=2),
    _drum("tambourine", 54),
    _drum("cowbell", 56),
    _drum("triangle", 81, max_hits=2),
]
CLASS_BY_NAME: dict[str, SoundClass] = {c.name: c for c in CLASSES}

# Never used in training: each has a seen relative (violin, trumpet, glockenspiel, acoustic guitar,
# cymbal, piano), so zero-shot transfer to the unseen word has something to go on.
HELDOUT_CLASSES: list[str] = ["cello", "trombone", "xylophone", "banjo", "hi-hat", "harpsichord"]
SEEN_CLASSES: list[str] = [c.name for c in CLASSES if c.name not in HELDOUT_CLASSES]
assert len(SEEN_CLASSES) == 30 and len(CLASSES) == 36
