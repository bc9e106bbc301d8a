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

`caption_metrics` reports scores from aac-metrics when it is installed (aac.py) and says which tokenizer
and which implementation produced them. On the same tokens the built-in BLEU, ROUGE-L and CIDEr-D equal
aac-metrics' (tests/captioning), except where aac-metrics refuses a corpus that coco's code scores: CIDEr-D
of a single clip (coco: 0, every IDF is log 1) and ROUGE-L against an empty reference (coco: recall 0).
The tokenizers differ by design: PTB splits clitics ("dog's" -> "dog 's") and keeps hyphenated words and
decimals whole ("high-pitched", "2.5"), where the regex keeps "dog's" and splits the other two.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

from collat.captioning import aac
from collat.captioning.aac import external_metrics
from collat.captioning.vocab import tokenize_caption

Tokenizer = Callable[[str], list[str]]
SCORERS = ("auto", "aac-metrics", "builtin")
TOKENIZERS = ("auto", aac.PTB, aac.REGEX)


def _ngram_counts(words: Sequence[str], max_n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def check_corpus(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("cannot score an empty set of captions")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{i}] must be a non-empty list of captions, got {refs!r}")


def _tokenized(candidates, references, tokenizer: Tokenizer):
    check_corpus(candidates, references)
    return [tokenizer(c) for c in candidates], [[tokenizer(r) for r in refs] for refs in references]


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4,
         tokenizer: Tokenizer = tokenize_caption) -> list[float]:
    """Corpus BLEU-1..max_n as in coco-caption (module docstring). Returns [BLEU-1, ..., BLEU-max_n]."""
    cands, refs_all = _tokenized(candidates, references, tokenizer)
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


def rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2,
            tokenizer: Tokenizer = tokenize_caption) -> float:
    """Mean ROUGE-L F-score as in coco-caption (module docstring); an empty candidate scores 0."""
    cands, refs_all = _tokenized(candidates, references, tokenizer)
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


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4, sigma: float = 6.0,
            tokenizer: Tokenizer = tokenize_caption) -> float:
    """Corpus CIDEr-D as in coco-caption (module docstring): the mean of the per-clip scores."""
    cands, refs_all = _tokenized(candidates, references, tokenizer)
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


def builtin_scores(candidates: Sequence[str], references: Sequence[Sequence[str]],
                   tokenizer: Tokenizer = tokenize_caption) -> dict:
    results = {f"BLEU_{n}": v for n, v in enumerate(bleu(candidates, references, tokenizer=tokenizer), start=1)}
    results["ROUGE_L"] = rouge_l(candidates, references, tokenizer=tokenizer)
    results["CIDEr-D"] = cider_d(candidates, references, tokenizer=tokenizer)
    return results


def tokenize_corpus(candidates, references, tokenizer: str = "auto") -> tuple[str, list[str], list[list[str]], list[str]]:
    """(tokenizer used, candidates, references as space-joined tokens, notes). auto: PTB where it can run."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    notes = []
    if tokenizer != aac.REGEX:
        reason = aac.ptb_missing_reason()
        if reason is None:
            cands, refs = aac.ptb_tokenize(candidates, references)
            return aac.PTB, cands, refs, notes
        if tokenizer == aac.PTB:
            raise ValueError(f"the PTB tokenizer cannot run: {reason}")
        notes.append(f"PTB tokenizer not used: {reason}; captions were tokenised by the {aac.TOKENIZER_NAMES[aac.REGEX]}")
    return aac.REGEX, [_joined(c) for c in candidates], [[_joined(r) for r in refs] for refs in references], notes


def _joined(text: str) -> str:
    return " ".join(tokenize_caption(text))


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]], external: bool = True,
                    scorer: str = "auto", tokenizer: str = "auto") -> dict:
    """BLEU-1..4, ROUGE-L, CIDEr-D (and METEOR/SPICE when available), with "tokenizer" (ptb | regex),
    "scorer" (which implementation) and "notes" (why anything was not computed or fell back).

    tokenizer: auto = PTB where aac-metrics, Java and its jar are present, else the built-in regex.
    scorer: auto = aac-metrics when installed, else the built-in implementations."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    check_corpus(candidates, references)
    used_tokenizer, cands, refs, notes = tokenize_corpus(candidates, references, tokenizer)
    results: dict = builtin_scores(cands, refs, tokenizer=str.split)
    use_aac = scorer == "aac-metrics" or (scorer == "auto" and aac.installed())
    if use_aac:
        if not aac.installed():
            raise ImportError("scorer 'aac-metrics' needs the aac-metrics package (pip install aac-metrics)")
        results, fallbacks = aac.scores(cands, refs, results)
        notes += fallbacks
        used_scorer = f"aac-metrics {aac.version()}"
    else:
        used_scorer = "collat built-in"
        if scorer == "auto":
            notes.append("BLEU/ROUGE-L/CIDEr-D from collat's built-in code (aac-metrics is not installed; on the "
                         "same tokens both give the same scores)")
    if external:
        extra, extra_notes = external_metrics(cands, refs)
        results.update(extra)
        notes += extra_notes
    else:
        results.update({"METEOR": None, "SPICE": None})
        notes.append("METEOR and SPICE not computed: disabled by the caller")
    results.update(tokenizer=used_tokenizer, scorer=used_scorer, notes=notes)
    return results
