"""Caption metrics, following the coco-caption code (pycocoevalcap 1.2) that the DCASE/AudioCaps
literature reports, re-implemented in pure Python:
- BLEU-1..4: corpus-level clipped n-gram counts (each n-gram's count clipped at its maximum count in
  any one reference), geometric mean of the 1..n precisions (1e-15 / 1e-9 smoothing as in coco),
  brevity penalty exp(1 - r/c) when the corpus length c is below r, where r sums, per caption, the
  reference length closest to the candidate's (ties -> the shorter).
- ROUGE-L: per caption, LCS-based precision and recall, each maximised over the references, combined
  as F = (1 + b^2) P R / (R + b^2 P) with b = 1.2; averaged over captions.
- CIDEr-D: TF-IDF n-gram vectors (n = 1..4; IDF = log(#clips) - log(max(1, df)), df counted over the
  clips' reference sets), clipped similarity sum(min(v_c, v_r) * v_r) / (|v_c| |v_r|), Gaussian
  length penalty exp(-(l_c - l_r)^2 / (2 * 6^2)), averaged over n and references, times 10. As in
  coco's code, the "length" is the number of bigrams (words - 1 for non-empty captions).
- METEOR and SPICE need Java and the ``aac-metrics`` package (with its downloaded jars); when either
  is missing they are reported as None with the reason, never silently left out.
"""
from __future__ import annotations

import importlib.util
import math
import shutil
from collections import Counter, defaultdict
from typing import Sequence

from collat.captioning.vocab import tokenize_caption


def _ngram_counts(words: Sequence[str], max_n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def _check_corpus(candidates: Sequence[str], references: Sequence[Sequence[str]]):
    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("cannot score an empty set of captions")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{i}] must be a non-empty list of captions, got {refs!r}")
    return [tokenize_caption(c) for c in candidates], [[tokenize_caption(r) for r in refs] for refs in references]


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n as in coco-caption (module docstring). Returns [BLEU-1, ..., BLEU-max_n]."""
    cands, refs_all = _check_corpus(candidates, references)
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * max_n, [0] * max_n
    cand_total, ref_total = 0, 0
    for cand, refs in zip(cands, refs_all):
        counts = _ngram_counts(cand, max_n)
        max_ref_counts: dict = {}
        for ref in refs:
            for ngram, c in _ngram_counts(ref, max_n).items():
                max_ref_counts[ngram] = max(max_ref_counts.get(ngram, 0), c)
        for ngram, c in counts.items():
            correct[len(ngram) - 1] += min(c, max_ref_counts.get(ngram, 0))
        for n in range(1, max_n + 1):
            guess[n - 1] += max(0, len(cand) - n + 1)
        cand_total += len(cand)
        ref_total += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
    scores, product = [], 1.0
    for n in range(max_n):
        product *= (correct[n] + tiny) / (guess[n] + small)
        scores.append(product ** (1.0 / (n + 1)))
    ratio = (cand_total + tiny) / (ref_total + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """Mean ROUGE-L F-score as in coco-caption (module docstring); an empty candidate scores 0."""
    cands, refs_all = _check_corpus(candidates, references)
    scores = []
    for cand, refs in zip(cands, refs_all):
        if not cand:
            scores.append(0.0)
            continue
        lcs = [_lcs_length(ref, cand) for ref in refs]
        precision = max(l / len(cand) for l in lcs)
        recall = max(l / len(ref) if ref else 0.0 for l, ref in zip(lcs, refs))
        if precision == 0 or recall == 0:
            scores.append(0.0)
        else:
            scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision))
    return sum(scores) / len(scores)


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D as in coco-caption (module docstring): the mean of the per-clip scores."""
    cands, refs_all = _check_corpus(candidates, references)
    cand_counts = [_ngram_counts(c, max_n) for c in cands]
    ref_counts = [[_ngram_counts(r, max_n) for r in refs] for refs in refs_all]
    document_frequency: Counter = Counter()
    for refs in ref_counts:
        document_frequency.update(set(ngram for ref in refs for ngram in ref))
    log_num_clips = math.log(len(cands))

    def tfidf(counts: Counter):
        vectors = [defaultdict(float) for _ in range(max_n)]
        norms = [0.0] * max_n
        bigram_length = 0
        for ngram, tf in counts.items():
            n = len(ngram) - 1
            weight = tf * (log_num_clips - math.log(max(1.0, document_frequency[ngram])))
            vectors[n][ngram] = weight
            norms[n] += weight * weight
            if n == 1:
                bigram_length += tf
        return vectors, [math.sqrt(x) for x in norms], bigram_length

    scores = []
    for counts, refs in zip(cand_counts, ref_counts):
        vec, norm, length = tfidf(counts)
        total = 0.0
        for ref in refs:
            vec_r, norm_r, length_r = tfidf(ref)
            penalty = math.exp(-((length - length_r) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                value = sum(min(w, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0) for g, w in vec[n].items())
                if norm[n] != 0 and norm_r[n] != 0:
                    value /= norm[n] * norm_r[n]
                total += value * penalty
        scores.append(10.0 * total / max_n / len(refs))
    return sum(scores) / len(scores)


def external_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[dict, list[str]]:
    """METEOR and SPICE through aac-metrics when Java and aac-metrics are present.

    Returns ({"METEOR": float | None, "SPICE": float | None}, notes): a metric that could not be
    computed is None and a note says why.
    """
    results: dict = {"METEOR": None, "SPICE": None}
    if shutil.which("java") is None:
        return results, ["METEOR and SPICE not computed: Java is not installed (they run on the JVM)"]
    if importlib.util.find_spec("aac_metrics") is None:
        return results, [
            "METEOR and SPICE not computed: the aac-metrics package is not installed "
            "(pip install aac-metrics && aac-metrics-download, which needs network access)"
        ]
    notes = []
    try:
        from aac_metrics import functional as aac_functional  # optional dependency
    except Exception as error:  # a broken install: say so instead of failing the whole evaluation
        return results, [f"METEOR and SPICE not computed: importing aac-metrics failed ({type(error).__name__}: {error})"]
    for name in ("METEOR", "SPICE"):
        # aac-metrics >= 0.3 names them meteor/spice; older releases coco_meteor/coco_spice.
        function = getattr(aac_functional, name.lower(), None) or getattr(aac_functional, f"coco_{name.lower()}", None)
        if function is None:
            notes.append(f"{name} not computed: this aac-metrics version has no {name.lower()} function")
            continue
        try:
            corpus_scores, _ = function(list(candidates), [list(r) for r in references])
            results[name] = float(corpus_scores[name.lower()])
        except Exception as error:  # a missing jar or a JVM failure: report it, keep the other metrics
            notes.append(f"{name} not computed: aac-metrics failed with {type(error).__name__}: {error}")
    return results, notes


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]], external: bool = True) -> dict:
    """BLEU-1..4, ROUGE-L, CIDEr-D (and METEOR/SPICE when available) with a 'notes' list."""
    scores = bleu(candidates, references)
    results: dict = {f"BLEU_{n}": s for n, s in enumerate(scores, start=1)}
    results["ROUGE_L"] = rouge_l(candidates, references)
    results["CIDEr-D"] = cider_d(candidates, references)
    notes: list[str] = []
    if external:
        extra, notes = external_metrics(candidates, references)
        results.update(extra)
    else:
        results.update({"METEOR": None, "SPICE": None})
        notes.append("METEOR and SPICE not computed: disabled by the caller")
    results["notes"] = notes
    return results
