"""Caption metrics on hand-computed cases, the vocabulary, decoding, and the decoder overfitting."""
import itertools
import math

import pytest
import torch

from collat import captioning
from collat.captioning import CaptionerConfig, CaptionTraining, Vocabulary
from collat.captioning import aac as aac_module
from collat.captioning.__main__ import main as captioning_main

CAT = "the cat sat on the mat"
CAT_REFS = ["the cat is on the mat", "there is a cat on the mat"]


def test_tokenize_caption_drops_case_and_punctuation():
    assert captioning.tokenize_caption("A Dog, barking!  Loudly.") == ["a", "dog", "barking", "loudly"]
    with pytest.raises(TypeError, match="str"):
        captioning.tokenize_caption(None)


def test_bleu_hand_computed():
    # Clipped matches: 1-grams 5/6 (sat misses), 2-grams 3/5 (the cat, on the, the mat),
    # 3-grams 1/4 (on the mat), 4-grams 0/3. Closest reference length 6 = candidate: no penalty.
    b1, b2, b3, b4 = captioning.bleu([CAT], [CAT_REFS])
    assert b1 == pytest.approx(5 / 6)
    assert b2 == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert b3 == pytest.approx(0.5)  # (5/6 * 3/5 * 1/4) ** (1/3) = (1/8) ** (1/3)
    assert b4 < 1e-3


def test_bleu_brevity_penalty_and_corpus_counts():
    b1, b2, *_ = captioning.bleu(["the cat"], [["the cat is here"]])
    assert b1 == pytest.approx(math.exp(1 - 4 / 2))
    assert b2 == pytest.approx(math.exp(1 - 4 / 2))
    # Corpus level: (2 + 0) matches / (2 + 4) words, not the mean of the sentence scores (0.5).
    b1, *_ = captioning.bleu(["a b", "c d e f"], [["a b"], ["w x y z"]])
    assert b1 == pytest.approx(2 / 6)


def test_bleu_closest_reference_length_ties_pick_the_shorter():
    # Candidate of 5 words, references of 4 and 6 words: r = 4 <= c, so no brevity penalty.
    b1, *_ = captioning.bleu(["a b c d e"], [["a b c d", "a b c d e f"]])
    assert b1 == pytest.approx(1.0)


def test_bleu_clips_repeated_words():
    b1, *_ = captioning.bleu(["the the the the"], [["the cat is on the mat"]])
    assert b1 == pytest.approx(2 / 4 * math.exp(1 - 6 / 4))


def test_rouge_l_hand_computed():
    # LCS(cand, ref1) = "the cat on the mat" = 5 -> P = R = 5/6 -> F = 5/6.
    assert captioning.rouge_l([CAT], [CAT_REFS[:1]]) == pytest.approx(5 / 6)
    # coco takes max precision and max recall over references separately: ref1 gives R = 1,
    # ref2 gives P = 1 -> F = 1 (the best per-reference F would be 0.83).
    assert captioning.rouge_l(["a b c"], [["a b", "a b c d e f"]]) == pytest.approx(1.0)
    beta2 = 1.2**2
    p, r = 2 / 3, 2 / 4
    expected = (1 + beta2) * p * r / (r + beta2 * p)
    assert captioning.rouge_l(["a b x", ""], [["a y b z"], ["a"]]) == pytest.approx(expected / 2)


def test_cider_d_hand_computed():
    # Two clips, so IDF = log 2 for n-grams seen in one clip's references.
    # Clip 1: candidate == reference, all n-grams unique -> cosine 1 at n = 1..4 -> 10.
    # Clip 2: "e f" vs "e f g h": 1-gram cosine 2/(sqrt2*2) = 1/sqrt2, 2-gram 1/sqrt3, 3-, 4-gram 0;
    # bigram lengths 1 vs 3 -> penalty exp(-4 / 72).
    clip2 = 10 * (1 / math.sqrt(2) + 1 / math.sqrt(3)) / 4 * math.exp(-4 / 72)
    score = captioning.cider_d(["a b c d", "e f"], [["a b c d"], ["e f g h"]])
    assert score == pytest.approx((10 + clip2) / 2)


def test_cider_d_clips_term_frequency():
    # "e e e e" vs "e f g h": 1-gram weight 4 log2 clipped to log2 -> log2^2 / (4 log2 * 2 log2) = 1/8;
    # "e e" etc. are absent from the reference. Without clipping the 1-gram term would be 1/2.
    score = captioning.cider_d(["a b c d", "e e e e"], [["a b c d"], ["e f g h"]])
    assert score == pytest.approx((10 + 10 * (1 / 8) / 4) / 2)


def test_cider_d_averages_over_references_and_is_zero_for_a_single_clip():
    # Same corpus, clip 2 gets a second reference identical to its candidate.
    clip2 = 10 * (1 / math.sqrt(2) + 1 / math.sqrt(3)) / 4 * math.exp(-4 / 72)
    score = captioning.cider_d(["a b c d", "e f"], [["a b c d"], ["e f g h", "e f"]])
    # "e f" now has df 1 in clip 2 still (df counts clips), so the second reference scores 1 at n = 1, 2 only.
    assert score == pytest.approx((10 + (clip2 + 10 * 2 / 4) / 2) / 2)
    # One clip: log(#clips) = 0, every IDF weight is 0 (coco's behaviour).
    assert captioning.cider_d(["a b"], [["a b"]]) == 0.0


def test_metrics_reject_mismatched_input():
    with pytest.raises(ValueError, match="candidates"):
        captioning.bleu(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="non-empty list"):
        captioning.cider_d(["a"], [[]])
    with pytest.raises(ValueError, match="non-empty list"):
        captioning.rouge_l(["a"], ["a"])
    with pytest.raises(ValueError, match="empty set"):
        captioning.bleu([], [])


def test_caption_metrics_reports_why_meteor_and_spice_are_missing():
    result = captioning.caption_metrics([CAT, "a b"], [CAT_REFS, ["a b"]])
    assert set(result) >= {"BLEU_1", "BLEU_4", "ROUGE_L", "CIDEr-D", "METEOR", "SPICE", "notes"}
    for name in ("METEOR", "SPICE"):
        if result[name] is None:
            assert any(name in note for note in result["notes"])
    off = captioning.caption_metrics([CAT], [CAT_REFS], external=False)
    assert off["METEOR"] is None and any("METEOR and SPICE not computed: disabled" in n for n in off["notes"])


def test_external_metrics_say_what_is_missing(monkeypatch):
    monkeypatch.setattr(aac_module.shutil, "which", lambda name: None)
    scores, notes = captioning.external_metrics([CAT], [CAT_REFS])
    assert scores == {"METEOR": None, "SPICE": None} and "Java is not installed" in notes[0]
    monkeypatch.setattr(aac_module.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(aac_module, "installed", lambda: False)
    scores, notes = captioning.external_metrics([CAT], [CAT_REFS])
    assert scores == {"METEOR": None, "SPICE": None} and "aac-metrics package is not installed" in notes[0]


def test_vocabulary_roundtrip_and_unknown_words():
    vocab = Vocabulary.build(["a dog barks", "A dog, a cat."], min_count=1)
    assert vocab.words[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert vocab.words[4:6] == ["a", "dog"]  # most frequent first
    ids = vocab.encode("a cat barks loudly", max_len=10)
    assert ids[0] == vocab.bos_id and ids[-1] == vocab.eos_id and vocab.unk_id in ids
    assert vocab.decode(ids) == "a cat barks <unk>"
    assert len(vocab.encode("a a a a a", max_len=2)) == 4
    assert Vocabulary(vocab.words).words == vocab.words
    assert Vocabulary.build(["a b b"], min_count=2).words[4:] == ["b"]
    with pytest.raises(ValueError, match="no words"):
        Vocabulary.build(["...", ""])


def _tiny_config(vocab, memory_len=5, memory_dim=8, max_words=10):
    return CaptionerConfig(memory_dim=memory_dim, memory_len=memory_len, vocab_size=len(vocab), dim=32,
                           num_heads=2, ff_dim=64, dropout=0.0, max_words=max_words)


def test_decoder_overfits_two_captions_and_decodes_them():
    captions = [["a dog barks"], ["the violin plays a loud note"]]
    vocab = Vocabulary.build([c for cs in captions for c in cs])
    memory = torch.randn(2, 5, 8)
    decoder, history = captioning.train_captioner(
        memory, captions, vocab, _tiny_config(vocab), CaptionTraining(epochs=60, batch_size=2, lr=1e-2)
    )
    assert history[-1] < 0.05 < history[0]
    decoded = [vocab.decode(ids) for ids in decoder.greedy(memory, vocab)]
    assert decoded == ["a dog barks", "the violin plays a loud note"]
    beams = [vocab.decode(ids) for ids in decoder.beam_search(memory, vocab, beam_size=3)]
    assert beams == decoded


def test_beam_search_is_exact_when_the_beam_holds_every_caption():
    vocab = Vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", "x", "y"])
    torch.manual_seed(1)
    decoder = captioning.CaptionDecoder(_tiny_config(vocab, max_words=2)).eval()
    with torch.no_grad():
        decoder.lm_head.weight.mul_(20)  # peaked, varied distributions
    memory = torch.randn(3, 5, 8)
    words = [vocab.unk_id, vocab.index["x"], vocab.index["y"]]
    every_caption = [[]] + [[a] for a in words] + [[a, b] for a, b in itertools.product(words, words)]
    for clip in range(3):
        m = memory[clip : clip + 1].expand(len(every_caption), -1, -1)
        log_probs = captioning.sequence_log_prob(decoder, m, every_caption, vocab)
        best = every_caption[int(log_probs.argmax())]
        assert decoder.beam_search(memory[clip : clip + 1], vocab, beam_size=16)[0] == best
        greedy = decoder.greedy(memory[clip : clip + 1], vocab)[0]
        assert len(greedy) <= 2
        assert decoder.beam_search(memory[clip : clip + 1], vocab, beam_size=1)[0] == greedy


def test_decoder_rejects_bad_memory_and_beam():
    vocab = Vocabulary.build(["a b"])
    decoder = captioning.CaptionDecoder(_tiny_config(vocab))
    with pytest.raises(ValueError, match="memory must be"):
        decoder.greedy(torch.randn(1, 4, 8), vocab)
    with pytest.raises(ValueError, match="beam_size"):
        decoder.beam_search(torch.randn(1, 5, 8), vocab, beam_size=0)


def test_save_and_load_captioner(tmp_path):
    vocab = Vocabulary.build(["a dog barks"])
    decoder = captioning.CaptionDecoder(_tiny_config(vocab)).eval()
    captioning.save_captioner(tmp_path / "cap", decoder, vocab)
    loaded, loaded_vocab, meta = captioning.load_captioner(tmp_path / "cap")
    assert loaded_vocab.words == vocab.words and meta["version"] == 1
    memory = torch.randn(2, 5, 8)
    assert decoder.greedy(memory, vocab) == loaded.greedy(memory, loaded_vocab)
    with pytest.raises(FileNotFoundError, match="captioner.json"):
        captioning.load_captioner(tmp_path / "missing")




def _captioned_manifest(tmp_path, with_captions=True):
    import json

    import numpy as np
    import soundfile

    rows = []
    for split, count in (("train", 4), ("test", 2)):
        for i in range(count):
            path = tmp_path / f"{split}{i}.wav"
            soundfile.write(path, 0.1 * np.random.default_rng(i).standard_normal(12000).astype(np.float32), 16000)
            row = {"path": path.name, "split": split, "labels": ["noise"]}
            if with_captions:
                row["captions"] = [f"noise number {i}", "a hiss of noise"]
            rows.append(row)
    manifest = tmp_path / "caps.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return manifest


def test_cli_trains_and_scores_a_captioner(model_dir, tmp_path, capsys):
    import json

    out, saved = tmp_path / "caps.json", tmp_path / "captioner"
    code = captioning_main(["--model", str(model_dir), "--manifest", str(_captioned_manifest(tmp_path)),
                            "--epochs", "2", "--dim", "32", "--beam", "2", "--out", str(out), "--save", str(saved)])
    assert code == 0, capsys.readouterr().err
    results = json.loads(out.read_text())
    assert results["train_clips"] == 4 and results["test_clips"] == 2 and len(results["train_loss"]) == 2
    for decoding in ("greedy", "beam2"):
        assert {"BLEU_1", "BLEU_4", "ROUGE_L", "CIDEr-D", "METEOR", "SPICE", "notes"} <= set(results[decoding])
    decoder, vocab, meta = captioning.load_captioner(saved)
    assert meta["features"] == "conditioning" and "noise" in vocab.index
    assert results["tokenizer"] == aac_module.TOKENIZER_NAMES[results["greedy"]["tokenizer"]]
    assert results["scorer"] == results["greedy"]["scorer"]
    out = capsys.readouterr().out
    assert "| greedy |" in out and f"tokenizer: {results['tokenizer']}" in out and f"scores: {results['scorer']}" in out


def test_cli_errors(model_dir, tmp_path, capsys):
    out = tmp_path / "caps.json"
    assert captioning_main(["--model", str(tmp_path / "nope"), "--out", str(out)]) == 1
    assert "not found" in capsys.readouterr().err
    manifest = _captioned_manifest(tmp_path, with_captions=False)
    assert captioning_main(["--model", str(model_dir), "--manifest", str(manifest), "--out", str(out)]) == 1
    assert "caption" in capsys.readouterr().err
    assert captioning_main(["--model", str(model_dir), "--epochs", "0", "--out", str(out)]) == 1
    assert not out.exists()
