"""The evaluation tasks of a trained CoLLAT (paper Tables 2 and 3), on one set of clips at a time:

- zero-shot: cosine between the clip embedding z_a and the prompt "This is a sound of {label}" of
  every class. Single-label sets report top-1 / top-5 accuracy, multi-label sets macro mAP.
- probe (frozen model features, see probes.py), trained on the set's training clips.
- retrieval audio->text and text->audio: R@1/5/10, MRR, mAP@10 (LAION-CLAP / WavCaps), on sets with
  captions.
- noisy: the zero-shot and retrieval numbers again with seeded Gaussian noise (std 0.1, identical for
  every model) on the waveform (what "noisy audio" means to a user, and the paper's Table 3a test) or
  on the normalised fbank (the domain of L_ut's training noise).
Metric definitions are in metrics.py; `DEFINITIONS` goes into every results file.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from collat.evaluate import metrics
from collat.evaluate.features import (
    NOISE_DOMAINS,
    Noise,
    class_prompt_embeddings,
    extract_features,
)
from collat.evaluate.probes import ProbeTraining, decoder_probe, logistic_probe
from collat.evaluate.sets import ClipSet

PROBES = ("decoder", "logreg")
TASKS = ("zero-shot", "probe", "retrieval", "noisy")


@dataclass
class EvalOptions:
    tasks: tuple[str, ...] = TASKS
    probes: tuple[str, ...] = ("decoder",)
    noise_domains: tuple[str, ...] = NOISE_DOMAINS
    noise_std: float = 0.1
    noise_seed: int = 0
    batch_size: int = 32
    probe_training: ProbeTraining = field(default_factory=ProbeTraining)

    def validate(self):
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")
        for probe in self.probes:
            if probe not in PROBES:
                raise ValueError(f"unknown probe {probe!r}; probes are {PROBES}")
        for domain in self.noise_domains:
            Noise(domain, self.noise_std, self.noise_seed)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, class_names: list[str], multi_label: bool,
                           prefix: str, notes: list[str]) -> dict[str, float]:
    if multi_label:
        result = metrics.mean_average_precision(scores, labels, class_names)
        if result.skipped:
            notes.append(f"{prefix}: {result.note()}")
        return {f"{prefix}/mAP": result.value}
    out = {f"{prefix}/top1": metrics.topk_accuracy(scores, labels, 1)}
    if len(class_names) >= 5:
        out[f"{prefix}/top5"] = metrics.topk_accuracy(scores, labels, 5)
    return out


def _retrieval(embedding: torch.Tensor, caption_embeddings: torch.Tensor, owner: list[int]) -> dict[str, float]:
    result = metrics.retrieval_metrics(embedding @ caption_embeddings.T, owner)
    return {f"retrieval/{key}": value for key, value in result.items()}


class _Scorer:
    """Zero-shot and retrieval metrics of one set's clip embeddings; the prompt and caption embeddings
    are computed once and serve every condition (clean and noisy)."""

    def __init__(self, model, clip_set: ClipSet, options: EvalOptions, multi_label: bool):
        self.clip_set, self.multi_label = clip_set, multi_label
        self.prompts = None
        if clip_set.labels is not None and "zero-shot" in options.tasks:
            self.prompts = class_prompt_embeddings(model, clip_set.class_names)
        self.captions = self.owner = None
        if clip_set.captions is not None and "retrieval" in options.tasks:
            flat = [caption for captions in clip_set.captions for caption in captions]
            self.owner = [clip for clip, captions in enumerate(clip_set.captions) for _ in captions]
            self.captions = model.encode_text(flat).cpu()

    @property
    def has_targets(self) -> bool:
        return self.clip_set.labels is not None or self.captions is not None

    def score(self, features: dict, notes: list[str]) -> dict[str, float]:
        out = {}
        if self.prompts is not None:
            cosine = features["embedding"] @ self.prompts.T
            out.update(classification_metrics(cosine, self.clip_set.labels, self.clip_set.class_names,
                                              self.multi_label, "zero-shot", notes))
        if self.captions is not None:
            out.update(_retrieval(features["embedding"], self.captions, self.owner))
        return out


def _probe_metrics(model, clip_set: ClipSet, clean: dict, options: EvalOptions, multi_label: bool) -> dict:
    """Every requested probe, trained on the set's training clips and scored on its test clips."""
    train = extract_features(model, clip_set.train.waves, options.batch_size, None,
                             conditioning="decoder" in options.probes)
    out = {}
    for probe in options.probes:
        if probe == "decoder":
            scores = decoder_probe(train["conditioning"], clip_set.train.labels, clean["conditioning"], multi_label,
                                   options.probe_training)
        else:
            scores = logistic_probe(train["embedding"], clip_set.train.labels, clean["embedding"], multi_label,
                                    seed=options.probe_training.seed)
        out.update(classification_metrics(scores, clip_set.labels, clip_set.class_names, multi_label,
                                          f"probe-{probe}", []))
    return out


def evaluate_set(model, clip_set: ClipSet, options: EvalOptions, log=print) -> dict:
    """All requested tasks on one ClipSet: {"conditions": {"clean": {...}, "noisy-...": {...}}, ...}."""
    notes = list(clip_set.notes)
    has_labels = clip_set.labels is not None
    # A set is multi-label when its test or its training clips ever carry != 1 label.
    multi_label = clip_set.multi_label or (clip_set.train is not None and clip_set.train.multi_label)
    run_probe = "probe" in options.tasks and has_labels and bool(options.probes)
    if run_probe and clip_set.train is None:
        if not any(note.startswith("zero-shot only") for note in notes):
            notes.append("probe skipped: no training clips for this set")
        run_probe = False
    start = time.perf_counter()
    clean = extract_features(model, clip_set.waves, options.batch_size, None,
                             conditioning=run_probe and "decoder" in options.probes)
    log(f"  {clip_set.name}: {len(clip_set.waves)} clips encoded in {time.perf_counter() - start:.1f} s")
    scorer = _Scorer(model, clip_set, options, multi_label)
    conditions = {"clean": scorer.score(clean, notes)}
    if run_probe:
        conditions["clean"].update(_probe_metrics(model, clip_set, clean, options, multi_label))
    if "noisy" in options.tasks and scorer.has_targets:
        for domain in options.noise_domains:
            noise = Noise(domain, options.noise_std, options.noise_seed)
            conditions[noise.name] = scorer.score(extract_features(model, clip_set.waves, options.batch_size, noise), [])
    return {
        "num_clips": len(clip_set.waves),
        "num_classes": len(clip_set.class_names) if has_labels else 0,
        "multi_label": multi_label,
        "num_captions": sum(len(c) for c in clip_set.captions) if clip_set.captions is not None else 0,
        "probe_train_clips": len(clip_set.train.waves) if clip_set.train is not None else 0,
        "skipped_files": clip_set.skipped + (clip_set.train.skipped if clip_set.train is not None else 0),
        "conditions": conditions,
        "notes": notes,
    }


DEFINITIONS = {
    "zero-shot/top1, top5": "fraction of clips whose class is among the 1 / 5 classes with the highest cosine(z_a, prompt)",
    "zero-shot/mAP, probe-*/mAP": "macro mean over classes with a positive clip of sklearn average_precision_score",
    "probe-decoder": "1-layer transformer decoder head on conditioning(audio), trained on the train split",
    "probe-logreg": "sklearn LogisticRegression on z_a (one-vs-rest for multi-label), trained on the train split",
    "retrieval/*": "LAION-CLAP/WavCaps protocol, see collat.metrics (R@k and MRR use the best-ranked relevant caption)",
    "noisy-waveform": "Gaussian noise (std, seed below) added to the 16 kHz waveform",
    "noisy-fbank": "Gaussian noise (std, seed below) added to the normalised fbank, the domain of L_ut",
}


def run_evaluation(model, sets: list[ClipSet], options: EvalOptions, log=print) -> dict:
    options.validate()
    results = {"sets": {}, "options": {**asdict(options), "tasks": list(options.tasks)},
               "definitions": DEFINITIONS}
    for clip_set in sets:
        results["sets"][clip_set.name] = evaluate_set(model, clip_set, options, log)
    return results


def format_table(results: dict) -> str:
    """Markdown table: one row per (set, metric), one column per condition."""
    conditions = ["clean"] + sorted({c for s in results["sets"].values() for c in s["conditions"]} - {"clean"})
    lines = ["| set | metric | " + " | ".join(conditions) + " |", "|---|---|" + "---:|" * len(conditions)]
    for set_name, set_result in results["sets"].items():
        names = list(dict.fromkeys(k for c in conditions for k in set_result["conditions"].get(c, {})))
        for metric in names:
            cells = []
            for condition in conditions:
                value = set_result["conditions"].get(condition, {}).get(metric)
                cells.append("-" if value is None else f"{value:.4f}")
            lines.append(f"| {set_name} | {metric} | " + " | ".join(cells) + " |")
    notes = [f"- {name}: {note}" for name, s in results["sets"].items() for note in s["notes"]]
    return "\n".join(lines + ([""] + notes if notes else []))
