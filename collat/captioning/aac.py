"""The optional aac-metrics package (`pip install collat[captioning]`): the reference implementations of
the caption metrics that the DCASE / AudioCaps / Clotho literature reports.

- BLEU-1..4, ROUGE-L, CIDEr-D: pure Python in aac-metrics; used whenever it is installed.
- The PTB tokenizer (Stanford CoreNLP 3.4.1, the coco-caption tokenizer of published tables) and METEOR /
  SPICE run on Java and need the jars that `aac-metrics-download` fetches; each is used only where present,
  and every function here says why it was not.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Sequence

PTB = "ptb"
REGEX = "regex"
TOKENIZER_NAMES = {
    PTB: "PTB tokenizer (Stanford CoreNLP 3.4.1 through aac-metrics, as coco-caption)",
    REGEX: "collat regex tokenizer (lower-case words of letters and digits, punctuation dropped)",
}


def installed() -> bool:
    return importlib.util.find_spec("aac_metrics") is not None


def version() -> str:
    from importlib.metadata import version as package_version

    return package_version("aac-metrics")


def java_missing_reason() -> str | None:
    if shutil.which("java") is None:
        return "Java is not installed (it runs on the JVM)"
    return None


def ptb_missing_reason() -> str | None:
    """None when the PTB tokenizer can run; otherwise why not."""
    if not installed():
        return "the aac-metrics package is not installed (pip install aac-metrics)"
    reason = java_missing_reason()
    if reason:
        return reason
    from aac_metrics.utils.globals import get_default_cache_path
    from aac_metrics.utils.tokenization import FNAME_STANFORD_CORENLP_3_4_1_JAR

    jar = os.path.join(get_default_cache_path(), FNAME_STANFORD_CORENLP_3_4_1_JAR)
    if not os.path.isfile(jar):
        return f"its Stanford CoreNLP jar is missing ({jar}; aac-metrics-download fetches it, which needs network access)"
    return None


def ptb_tokenize(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """Candidates and references tokenised by aac-metrics' PTB tokenizer in one Java call, words joined by spaces."""
    from aac_metrics.utils.tokenization import preprocess_mult_sents

    tokenised = preprocess_mult_sents([[c] for c in candidates] + [list(r) for r in references])
    return [c[0] for c in tokenised[: len(candidates)]], tokenised[len(candidates):]


def scores(candidates: list[str], references: list[list[str]], builtin: dict) -> tuple[dict, list[str]]:
    """BLEU-1..4, ROUGE-L, CIDEr-D of space-tokenised captions from aac-metrics. Where aac-metrics refuses
    an input that coco's code scores (one clip for CIDEr-D, an empty reference for ROUGE-L), the built-in
    value (`builtin`, same names) is kept and a note says so."""
    from aac_metrics import functional as aac

    def bleu(n):
        return aac.bleu(candidates, references, n=n, tokenizer=str.split)[0][f"bleu_{n}"]

    computations = {f"BLEU_{n}": (lambda n=n: bleu(n)) for n in range(1, 5)}
    computations["ROUGE_L"] = lambda: aac.rouge_l(candidates, references, tokenizer=str.split)[0]["rouge_l"]
    computations["CIDEr-D"] = lambda: aac.cider_d(candidates, references, tokenizer=str.split)[0]["cider_d"]
    results, notes = {}, []
    for name, compute in computations.items():
        try:
            results[name] = float(compute())
        except Exception as error:  # aac-metrics refuses some corpora coco scores: keep the built-in value
            results[name] = builtin[name]
            notes.append(f"{name}: aac-metrics failed ({type(error).__name__}: {error}); the built-in value is reported")
    return results, notes


def external_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[dict, list[str]]:
    """METEOR and SPICE through aac-metrics when Java and aac-metrics are present.

    Returns ({"METEOR": float | None, "SPICE": float | None}, notes): a metric that could not be
    computed is None and a note says why.
    """
    results: dict = {"METEOR": None, "SPICE": None}
    reason = java_missing_reason()
    if reason:
        return results, [f"METEOR and SPICE not computed: {reason}"]
    if not installed():
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
