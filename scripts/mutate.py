"""Mutation testing: deliberately broken one-edit variants of the model, losses, augmentation, training,
data and metrics code; each must be killed (a test of the named files fails). Usage:
python scripts/mutate.py [--list] [NAME ...] (default: all; names like L3). Restores every file it touches,
also on Ctrl-C. Keeps one record per mutant in docs/results/mutation.json (a rerun replaces its mutants').
The ops have their own list: scripts/mutate_ops.py.
(Hand-written: mutmut/cosmic-ray mutate every operator of a file blindly and take hours on 2 cores; these
are the faults a reviewer would worry about, each aimed at the tests that should catch it.)"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOSS_TESTS = "tests/model/test_losses.py tests/model/test_model.py"
AUDIO_TESTS = "tests/model/test_audio.py tests/model/test_model.py"
AUG_TESTS = "tests/model/test_augment.py"
TRAIN_TESTS = "tests/train/test_optim.py tests/train/test_train.py tests/train/test_logging.py tests/adversarial/test_training_adversarial.py"
RESUME_TESTS = "tests/train/test_resume.py tests/adversarial/test_checkpoint_faults.py"
DATA_TESTS = "tests/data/test_collate.py tests/data/test_data_soundfont.py tests/data/test_data_real.py tests/adversarial/test_data_adversarial.py"
METRIC_TESTS = "tests/evaluate/test_metrics.py"

# (name, file, old text (must occur once), new text, test files)
MUTANTS = [
    # losses and their wiring
    ("L1 L_ct ignores the matching (identity perm)", "collat/model/losses.py",
     "    loss = ops.token_l1_loss(h_at, h_t, perm)",
     "    loss = ops.token_l1_loss(h_at, h_t, torch.where(perm >= 0, torch.arange(perm.shape[1], device=perm.device)"
     ".expand_as(perm), perm))", LOSS_TESTS),
    ("L2 L_cg one direction only", "collat/model/losses.py",
     "return (F.cross_entropy(logits_per_audio, labels) + F.cross_entropy(logits_per_text, labels)) / 2",
     "return F.cross_entropy(logits_per_audio, labels)", LOSS_TESTS),
    ("L3 logit scale not clamped", "collat/model/losses.py",
     "return log_scale.clamp(max=LOGIT_SCALE_MAX).exp()", "return log_scale.exp()", LOSS_TESTS),
    ("L4 rank share ignores token counts", "collat/model/losses.py",
     "return local_mean * (world_size * count / total.clamp(min=1.0)).to(local_mean.dtype)", "return local_mean",
     LOSS_TESTS + " tests/train/test_distributed.py"),
    ("L5 stop_grad_clean ignored", "collat/model/collat.py",
     "                clean = clean.detach()", "                clean = clean", LOSS_TESTS),
    ("L6 noisy twins paired with the wrong clips", "collat/model/collat.py",
     "            clean = h_at[:k]", "            clean = h_at.flip(0)[:k]", LOSS_TESTS),
    ("L7 loss weights swapped", "collat/model/collat.py",
     "loss = cfg.lambda_ct * l_ct + cfg.lambda_cg * l_cg", "loss = cfg.lambda_cg * l_ct + cfg.lambda_ct * l_cg",
     LOSS_TESTS),
    ("L8 waveform noise of half the configured std", "collat/model/collat.py",
     "twins = wave[:num_noisy].float() + cfg.noise_std *", "twins = wave[:num_noisy].float() + 0.5 * cfg.noise_std *",
     LOSS_TESTS),
    ("L9 prompt lengths one short", "collat/model/collat.py",
     "return h_t, z_t, mask.sum(dim=1)", "return h_t, z_t, mask.sum(dim=1) - 1", LOSS_TESTS),
    ("L10 audio embedding not normalised", "collat/model/collat.py",
     "z_a = F.normalize(self.text.encode_predicted(h_all[:rows]).float(), dim=-1)",
     "z_a = self.text.encode_predicted(h_all[:rows]).float()", LOSS_TESTS),
    ("L11 twins prompts in L_ct misaligned", "collat/model/collat.py",
     "torch.cat([h_t, h_t[: rows - B]])", "torch.cat([h_t, h_t.flip(0)[: rows - B]])", LOSS_TESTS),
    # audio front end
    ("A1 fbank normalised by std, not 2 std", "collat/model/audio.py",
     "            return (feats - self.mean) / (2 * self.std)", "            return (feats - self.mean) / self.std",
     AUDIO_TESTS),
    ("A2 wrong pre-emphasis", "collat/model/audio.py", "PREEMPHASIS = 0.97", "PREEMPHASIS = 0.95", AUDIO_TESTS),
    ("A3 padding value not the normalised zero", "collat/model/audio.py",
     "return (0.0 - self.mean) / (2 * self.std)", "return 0.0", AUDIO_TESTS),
    # augmentation
    ("G1 gain in power dB", "collat/model/augment.py", "torch.pow(10.0, db / 20)", "torch.pow(10.0, db / 10)", AUG_TESTS),
    ("G2 mixup not rescaled to the clip's peak", "collat/model/augment.py",
     "    out[rows] = mixed * scale", "    out[rows] = mixed", AUG_TESTS),
    ("G3 SpecAugment masks only where time and frequency bands cross", "collat/model/augment.py",
     "in_time[:, :, None] | in_freq[:, None, :]", "in_time[:, :, None] & in_freq[:, None, :]", AUG_TESTS),
    ("G4 twins get other clips' SpecAugment masks", "collat/model/augment.py",
     "torch.cat([self.time_draws, self.time_draws[:count]])", "torch.cat([self.time_draws, self.time_draws.flip(0)[:count]])",
     AUG_TESTS + " " + LOSS_TESTS),
    ("G5 noise curriculum ignored", "collat/train/augment.py",
     "min(1.0, (step + 1) / config.noise_augment_ramp)", "1.0", AUG_TESTS),
    ("G6 augmentation seeded without the step", "collat/train/augment.py",
     "    seed = [config.seed, step, rank]", "    seed = [config.seed, rank]", AUG_TESTS),
    # training
    ("T1 warmup starts one step late", "collat/train/optim.py",
     "return (step + 1) / train_config.warmup_steps", "return step / train_config.warmup_steps", TRAIN_TESTS),
    # (Weight decay on the temperature alone is an equivalent mutant: logit_scale is a scalar, so the
    # ndim < 2 rule already exempts it.)
    ("T2 weight decay on the position embeddings", "collat/train/optim.py",
     ' or "position_embeddings" in name', "", TRAIN_TESTS),
    ("T3 a non-finite gradient norm is not a skipped step", "collat/train/loop.py",
     "(~torch.isfinite(values[: len(terms) + 1]).all())", "(~torch.isfinite(values[: len(terms)]).all())", TRAIN_TESTS),
    ("T4 resume does not restore the RNG", "collat/train/checkpoint.py",
     "    torch.set_rng_state(state[\"torch\"])", "    pass", RESUME_TESTS),
    ("T5 the oldest of the crash leftovers wins", "collat/train/checkpoint.py",
     "    return max(found)[2] if found else None", "    return min(found)[2] if found else None", RESUME_TESTS),
    ("T6 cosine schedule not clamped past the end", "collat/train/optim.py",
     "math.cos(math.pi * min(progress, 1.0))", "math.cos(math.pi * progress)", TRAIN_TESTS + " " + RESUME_TESTS),
    # data
    ("D1 prompt without the Oxford comma", "collat/prompts.py",
     'f", and {names[-1]}"', 'f" and {names[-1]}"', DATA_TESTS),
    ("D2 only the first source labelled", "collat/data/soundfont.py",
     "labels[[self.class_names.index(name) for name in spec.names]] = 1.0",
     "labels[[self.class_names.index(spec.names[0])]] = 1.0", DATA_TESTS),
    ("D3 NaN samples accepted", "collat/data/audio_io.py",
     "    if not np.isfinite(data).all():", "    if False:", DATA_TESTS),
    ("D4 manifest labels split on commas", "collat/data/manifest.py",
     'LABEL_SEPARATOR = ";"', 'LABEL_SEPARATOR = ","', DATA_TESTS),
    ("D5 collate drops the class names", "collat/data/collate.py",
     '"names": [list(item.get("names", ())) for item in batch]', '"names": [[] for item in batch]',
     DATA_TESTS + " " + AUG_TESTS),
    # metrics
    ("M1 top-k counts one extra class", "collat/evaluate/metrics.py",
     "    top = _descending_order(scores)[:, :k]", "    top = _descending_order(scores)[:, :k + 1]", METRIC_TESTS),
    ("M2 ties broken against index order", "collat/evaluate/metrics.py",
     'return np.argsort(-scores, axis=-1, kind="stable")', 'return np.argsort(scores, axis=-1, kind="stable")[..., ::-1]',
     METRIC_TESTS),
    ("M3 classes without positives enter mAP", "collat/evaluate/metrics.py",
     "        if targets[:, c].sum() == 0:\n            skipped", "        if False:\n            skipped", METRIC_TESTS),
    ("M4 recall@k off by one", "collat/evaluate/metrics.py",
     'results[f"text_to_audio/R@{k}"] = float(np.mean(t2a_pos < k))',
     'results[f"text_to_audio/R@{k}"] = float(np.mean(t2a_pos <= k))', METRIC_TESTS),
    ("M5 audio-to-text AP over all relevant captions", "collat/evaluate/metrics.py",
     "/ min(len(relevant), MAP_CUTOFF)", "/ len(relevant)", METRIC_TESTS),
    ("M6 evaluation noise std squared", "collat/evaluate/metrics.py",
     "return wave + (std * noise)", "return wave + (std * std * noise)", METRIC_TESTS + " tests/evaluate/test_evaluate.py"),
]


def run_mutant(name: str, path: str, old: str, new: str, tests: str) -> dict:
    file = ROOT / path
    source = file.read_text()
    if source.count(old) != 1:
        raise SystemExit(f"{name}: the text to mutate occurs {source.count(old)} times in {path} (expected once)")
    file.write_text(source.replace(old, new))
    start = time.time()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests.split()],
                                cwd=ROOT, capture_output=True, text=True, timeout=1800)
    finally:
        file.write_text(source)
    lines = result.stdout.strip().splitlines()
    failed = [line.split(" ")[1] for line in lines if line.startswith(("FAILED", "ERROR"))]
    return {"name": name, "file": path, "killed": result.returncode != 0, "by": failed[:3],
            "summary": lines[-1] if lines else result.stderr[-200:], "seconds": round(time.time() - start, 1)}


def run_all(mutants: list, out: str) -> list[dict]:
    """Runs the mutants; `out` keeps one record per mutant (a rerun of some replaces theirs)."""
    path = pathlib.Path(out)
    records = {r["name"]: r for r in json.loads(path.read_text())["mutants"]} if path.exists() else {}
    results = []
    for mutant in mutants:
        record = run_mutant(*mutant)
        results.append(record)
        records[record["name"]] = record
        print(f"{record['name']}: {'KILLED' if record['killed'] else 'SURVIVED'} by {record['by'] or '-'} "
              f"({record['summary']}, {record['seconds']} s)", flush=True)
        ordered = [records[m[0]] for m in MUTANTS if m[0] in records]
        path.write_text(json.dumps({"killed": sum(r["killed"] for r in ordered), "total": len(ordered),
                                    "mutants": ordered}, indent=1) + "\n")
    print(f"{sum(r['killed'] for r in results)} of {len(results)} mutants killed in this run")
    return results


def main(argv: list[str]) -> int:
    if "--list" in argv:
        for mutant in MUTANTS:
            print(mutant[0])
        return 0
    chosen = [m for m in MUTANTS if not argv or m[0].split()[0] in argv]
    results = run_all(chosen, str(ROOT / "docs/results/mutation.json"))
    return 0 if all(r["killed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
