"""Evaluation of a trained CoLLAT: the one evaluator of collat (training's final table uses it too).

    sets.py      the clips (embedded soundfont sets, manifests)
    features.py  clip embeddings and per-token features, clean or noisy
    probes.py    linear probes on frozen features
    tasks.py     zero-shot, probes, retrieval, noisy audio on one set; the results table
    metrics.py   top-k accuracy, mAP, retrieval metrics
    quick.py     the short table at the end of a training run
    __main__.py  `python -m collat.evaluate`
"""
from collat.evaluate.features import (
           NOISE_DOMAINS,
           Noise,
           class_prompt_embeddings,
           extract_features,
)
from collat.evaluate.probes import (
           ProbeDecoder,
           ProbeTraining,
           decoder_probe,
           logistic_probe,
)
from collat.evaluate.sets import ClipSet, embedded_sets, manifest_sets
from collat.evaluate.tasks import (
           DEFINITIONS,
           PROBES,
           TASKS,
           EvalOptions,
           evaluate_set,
           format_table,
           run_evaluation,
)

__all__ = ["NOISE_DOMAINS", "Noise", "class_prompt_embeddings", "extract_features", "ProbeDecoder", "ProbeTraining",
           "decoder_probe", "logistic_probe", "ClipSet", "embedded_sets", "manifest_sets", "DEFINITIONS", "PROBES",
           "TASKS", "EvalOptions", "evaluate_set", "format_table", "run_evaluation"]
