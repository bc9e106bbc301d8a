"""The built-in BLEU/ROUGE-L/CIDEr-D against aac-metrics (the reference implementation), where the
scores come from, and which tokenizer is reported."""
import importlib.util
import random

import pytest

from collat import captioning
from collat.captioning import aac, metrics

HAS_AAC = importlib.util.find_spec("aac_metrics") is not None
needs_aac = pytest.mark.skipif(not HAS_AAC, reason="aac-metrics is not installed (pip install 'aac-metrics==0.5.4', "
                                                    "the [captioning] extra)")
METRICS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr-D")
WORDS = "a the dog cat barks meows loudly rain falls on roof man speaks car engine runs bird sings water".split()


def _perturbed_corpus(seed: int):
    """Candidates near their references (edits of one base caption), so every n-gram order has matches."""
    rng = random.Random(seed)

    def perturb(words):
        words = list(words)
        for _ in range(rng.randint(0, 3)):
            op = rng.random()
            if op < 0.3 and len(words) > 1:
                words.pop(rng.randrange(len(words)))
            elif op < 0.6:
                words.insert(rng.randrange(len(words) + 1), rng.choice(WORDS))
            else:
                words[rng.randrange(len(words))] = rng.choice(WORDS)
        return " ".join(words)

    bases = [[rng.choice(WORDS) for _ in range(rng.randint(1, 10))] for _ in range(rng.randint(2, 12))]
    return [perturb(b) for b in bases], [[perturb(b) for _ in range(rng.randint(1, 5))] for b in bases]


CORPORA = [
    (["a man is speaking while a car passes by", "rain falls on a tin roof", "a dog barks twice"],
     [["a man talks as a car drives past", "a person speaks and a vehicle passes"],
      ["heavy rain falls on a metal roof", "rain is falling on a roof", "raindrops hit a tin roof"],
      ["a dog is barking", "a dog barks two times loudly"]]),
    (["birds sing", "water runs from a tap", "", "an engine idles"],
     [["birds are singing in the trees"], ["water running from a faucet", "a tap runs"], ["wind blows"],
      ["an engine idles then revs", "a car engine is idling"]]),
] + [_perturbed_corpus(seed) for seed in range(20)]


@needs_aac
def test_builtin_metrics_equal_aac_metrics_on_tokenised_corpora():
    for candidates, references in CORPORA:
        ours = metrics.builtin_scores(candidates, references, tokenizer=str.split)
        theirs, notes = aac.scores(candidates, references, {name: float("nan") for name in METRICS})
        assert not notes, notes
        for name in METRICS:
            assert ours[name] == pytest.approx(theirs[name], rel=1e-9, abs=1e-12), (name, candidates)


@needs_aac
def test_scores_come_from_aac_metrics_when_installed():
    candidates, references = CORPORA[0]
    result = captioning.caption_metrics(candidates, references, external=False)
    assert result["scorer"] == f"aac-metrics {aac.version()}"
    # aac-metrics refuses a single clip for CIDEr-D; coco's value (0) is kept and the note says so.
    single = captioning.caption_metrics(candidates[:1], references[:1], external=False, scorer="aac-metrics")
    assert single["CIDEr-D"] == 0.0 and any(n.startswith("CIDEr-D: aac-metrics failed") for n in single["notes"])


def test_scorer_choice_is_honoured_and_reported(monkeypatch):
    candidates, references = CORPORA[0]
    fake = {name: 0.123 for name in METRICS}
    monkeypatch.setattr(aac, "installed", lambda: True)
    monkeypatch.setattr(aac, "version", lambda: "9.9")
    monkeypatch.setattr(aac, "scores", lambda c, r, builtin: (dict(fake), []))
    monkeypatch.setattr(aac, "ptb_missing_reason", lambda: "no jar here")
    result = captioning.caption_metrics(candidates, references, external=False)
    assert result["scorer"] == "aac-metrics 9.9" and all(result[name] == 0.123 for name in METRICS)
    builtin = captioning.caption_metrics(candidates, references, external=False, scorer="builtin")
    assert builtin["scorer"] == "collat built-in" and builtin["BLEU_1"] != 0.123
    assert builtin["BLEU_1"] == pytest.approx(captioning.bleu(candidates, references)[0])
    monkeypatch.setattr(aac, "installed", lambda: False)
    fallback = captioning.caption_metrics(candidates, references, external=False)
    assert fallback["scorer"] == "collat built-in" and any("aac-metrics is not installed" in n for n in fallback["notes"])
    with pytest.raises(ImportError, match="aac-metrics"):
        captioning.caption_metrics(candidates, references, scorer="aac-metrics")
    with pytest.raises(ValueError, match="scorer must be one of"):
        captioning.caption_metrics(candidates, references, scorer="nltk")


def test_tokenizer_is_ptb_where_it_can_run_and_reported(monkeypatch):
    candidates, references = ["A dog's bark, high-pitched!"], [["The dog barks."]]
    monkeypatch.setattr(aac, "ptb_missing_reason", lambda: "Java is not installed")
    result = captioning.caption_metrics(candidates, references, external=False, scorer="builtin")
    assert result["tokenizer"] == "regex"
    assert any("PTB tokenizer not used: Java is not installed" in n for n in result["notes"])
    with pytest.raises(ValueError, match="PTB tokenizer cannot run: Java is not installed"):
        captioning.caption_metrics(candidates, references, tokenizer="ptb")
    # Where it can run, the scores are computed on its tokens (here a stand-in with PTB's splits).
    monkeypatch.setattr(aac, "ptb_missing_reason", lambda: None)
    monkeypatch.setattr(aac, "ptb_tokenize", lambda c, r: (["a dog 's bark high-pitched"], [["the dog barks"]]))
    ptb = captioning.caption_metrics(candidates, references, external=False, scorer="builtin")
    assert ptb["tokenizer"] == "ptb" and ptb["BLEU_1"] == pytest.approx(1 / 5)  # only "dog" of 5 PTB tokens matches
    regex = captioning.caption_metrics(candidates, references, external=False, scorer="builtin", tokenizer="regex")
    assert regex["tokenizer"] == "regex" and regex["BLEU_1"] != ptb["BLEU_1"]


def test_regex_tokenizer_differs_from_ptb_as_documented():
    assert captioning.tokenize_caption("A dog's high-pitched bark, 2.5 s") == ["a", "dog's", "high", "pitched", "bark", "2", "5", "s"]
