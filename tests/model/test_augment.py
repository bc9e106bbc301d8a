"""Training augmentation: each transform does what it says, the batch's augmentation is a pure function of
(seed, step), the loop applies it once per training step and never at evaluation, and compile / fp8 options."""
import copy
import math
import sys
from pathlib import Path

import pytest
import torch

from collat.config import TrainConfig
from collat.model import CoLLAT
from collat.model.augment import (
    SpecMasks,
    mix_clips,
    random_gain,
    random_polarity,
    random_time_shift,
)
from collat.prompts import make_prompt
from collat.train.augment import augmented_inputs, mixup_pairs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import ToneDataset, model_config, train_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def waves(B=6, T=4000, seed=1):
    return torch.randn(B, T, generator=gen(seed)) * 0.3


# ------------------------------------------------------------------------------------------ transforms
def test_spec_masks_cover_what_they_draw_and_nothing_else():
    masks = SpecMasks.draw(64, max_time=30, max_freq=20, generator=gen())
    fbank = torch.randn(64, 100, 128)
    out = masks.apply(fbank, fill=-7.0)
    for axis, (draws, size, widest) in enumerate(((masks.time_draws, 100, 30), (masks.freq_draws, 128, 20))):
        start, width = SpecMasks.bands(draws, size, widest)
        assert (width >= 0).all() and (width < widest).all() and (start >= 0).all() and (start + width <= size).all()
        assert width.float().mean() > widest / 4  # widths spread over [0, widest)
    in_time, in_freq = masks.covered(100, 128)
    start, width = SpecMasks.bands(masks.time_draws, 100, 30)
    for b in range(64):  # rebuilt from the draws one clip at a time
        expected = torch.zeros(100, dtype=torch.bool)
        expected[int(start[b, 0]) : int(start[b, 0] + width[b, 0])] = True
        assert torch.equal(in_time[b], expected)
    covered = in_time[:, :, None] | in_freq[:, None, :]
    assert (out[covered] == -7.0).all() and torch.equal(out[~covered], fbank[~covered])
    assert masks.with_twins(3).time_draws.shape[0] == 67


def test_random_gain_scales_each_clip_within_the_range():
    w = waves(B=200)
    out = random_gain(w, 6.0, gen())
    ratio = out / w
    per_clip = ratio[:, :1]
    torch.testing.assert_close(ratio, per_clip.expand_as(ratio))  # one gain per clip
    db = 20 * per_clip.log10()
    assert db.min() >= -6.0 - 1e-4 and db.max() <= 6.0 + 1e-4 and db.min() < -4 and db.max() > 4


def test_random_polarity_flips_whole_clips():
    w = waves(B=64)
    out = random_polarity(w, gen())
    flipped = torch.tensor([torch.equal(o, -x) for o, x in zip(out, w)])
    kept = torch.tensor([torch.equal(o, x) for o, x in zip(out, w)])
    assert (flipped | kept).all() and 10 < int(flipped.sum()) < 54


def test_polarity_does_not_change_the_fbank():
    """Why `polarity` is off by default: the kaldi power spectrum of -x is bit-identical to that of x."""
    from collat.model.audio import FbankFrontEnd

    w = waves(B=3, T=8000)
    front = FbankFrontEnd(target_frames=50)
    assert torch.equal(front(-w), front(w))


def test_random_time_shift_rolls_each_clip():
    w = waves(B=16, T=500)
    out = random_time_shift(w, 100, gen())
    shifts = []
    for o, x in zip(out, w):
        found = [s for s in range(-100, 101) if torch.equal(torch.roll(x, s), o)]
        assert len(found) == 1
        shifts.extend(found)
    assert len(set(shifts)) > 8
    assert torch.equal(random_time_shift(w, 0, gen()), w)


def test_mix_clips_adds_the_original_partner_at_a_bounded_level_and_keeps_the_peak():
    w = waves(B=5)
    rows, partners = torch.tensor([0, 1]), torch.tensor([1, 3])  # clip 1 is mixed AND a partner: its original counts
    out = mix_clips(w, rows, partners, gen())
    for r, p in zip(rows.tolist(), partners.tolist()):
        # out[r] = c * (w[r] + g w[p]); solve for g from two samples, then check all samples and the peak.
        A = torch.stack([w[r], w[p]], dim=1).double()
        coef = torch.linalg.lstsq(A, out[r].double()[:, None]).solution.flatten()
        c, g = float(coef[0]), float(coef[1] / coef[0])
        assert 0.5 <= g <= 1.0
        torch.testing.assert_close(out[r], (c * (w[r] + g * w[p])).float(), rtol=1e-5, atol=1e-6)
        assert math.isclose(float(out[r].abs().max()), float(w[r].abs().max()), rel_tol=1e-5)
    assert torch.equal(out[2:], torch.cat([w[2:3], out[3:]])) and torch.equal(out[3:], w[3:])


def test_mixup_pairs_combine_prompts_and_respect_the_name_limit():
    import random

    names = [["violin"], ["piano"], ["harp", "flute"], ["snare drum", "bird tweet", "harp"], []]
    texts = [make_prompt(n) if n else "a caption" for n in names]
    rows, partners, new = mixup_pairs(names, texts, 1.0, 3, random.Random(0))
    assert 4 not in rows and 4 not in partners  # a clip without class names is never mixed
    for r, p in zip(rows, partners):
        union = set(names[r]) | set(names[p])
        assert len(union) <= 3 and r != p
        listed = new[r][len("This is a sound of "):].replace(", and ", ", ").replace(" and ", ", ").split(", ")
        assert set(listed) == union and new[r] == make_prompt(listed)
    assert 3 not in rows  # already three names: nothing can be added
    untouched = [i for i in range(5) if i not in rows]
    assert all(new[i] == texts[i] for i in untouched)
    assert mixup_pairs(names, texts, 0.0, 3, random.Random(0)) == ([], [], texts)


# ------------------------------------------------------------------------------------------ the batch
def batch_of(size=6, seed=0):
    from collat.data.collate import collate

    return collate([ToneDataset(size, seed=seed)[i] for i in range(size)])


def config(**overrides):
    values = dict(mixup=0.5, noise_augment=0.5, noise_augment_std=0.1)
    values.update(overrides)
    return TrainConfig(**values)


def test_augmentation_is_a_pure_function_of_seed_and_step():
    batch = batch_of()
    before = batch["wave"].clone()
    first = augmented_inputs(batch, 5, config(), torch.device("cpu"))
    again = augmented_inputs(batch, 5, config(), torch.device("cpu"))
    assert torch.equal(batch["wave"], before)  # the batch itself is not modified
    assert torch.equal(first["wave"], again["wave"]) and first["texts"] == again["texts"]
    assert torch.equal(first["spec_masks"].time_draws, again["spec_masks"].time_draws)
    assert not torch.equal(first["wave"], before)
    other_step = augmented_inputs(batch, 6, config(), torch.device("cpu"))
    other_seed = augmented_inputs(batch, 5, config(seed=1), torch.device("cpu"))
    assert not torch.equal(other_step["wave"], first["wave"]) and not torch.equal(other_seed["wave"], first["wave"])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    augmented_inputs(batch, 5, config(), torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG (L_ut's noise) is not drawn on


def test_augment_off_passes_the_batch_through():
    batch = batch_of()
    out = augmented_inputs(batch, 3, config(augment=False), torch.device("cpu"))
    assert torch.equal(out["wave"], batch["wave"]) and out["texts"] == batch["text"] and out["spec_masks"] is None


def test_noise_augmentation_ramps_and_hits_the_chosen_fraction():
    batch = {"wave": torch.zeros(400, 2000), "text": ["x"] * 400, "names": [[]] * 400}
    only_noise = dict(gain_db=0.0, polarity=False, time_shift=0.0, mixup=0.0, spec_time_mask=0, spec_freq_mask=0)
    full = augmented_inputs(batch, 100, config(noise_augment=0.25, noise_augment_ramp=10, **only_noise), torch.device("cpu"))
    stds = full["wave"].std(dim=1)
    assert 0.17 < float((stds > 0).float().mean()) < 0.33 and stds.max() <= 0.1 * 1.05 and stds.max() > 0.08
    early = augmented_inputs(batch, 0, config(noise_augment=0.25, noise_augment_ramp=10, **only_noise), torch.device("cpu"))
    assert early["wave"].std(dim=1).max() <= 0.01 * 1.05  # step 0 of a 10-step ramp: a tenth of the std


def test_bad_augmentation_values_are_clear_errors():
    with pytest.raises(ValueError, match="mixup must be a probability"):
        augmented_inputs(batch_of(), 0, config(mixup=1.5), torch.device("cpu"))
    with pytest.raises(ValueError, match="gain_db must be >= 0"):
        augmented_inputs(batch_of(), 0, config(gain_db=-1.0), torch.device("cpu"))


def test_training_augments_every_step_and_evaluation_never(tmp_path, monkeypatch):
    """The loop augments each training batch exactly once; the evaluations (untrained and trained) and the
    inference API see the clips as they are."""
    from collat.train import loop as loop_module
    from collat.train import run

    calls = []

    def counting(batch, step, *args, **kwargs):
        calls.append(step)
        return augmented_inputs(batch, step, *args, **kwargs)

    monkeypatch.setattr(loop_module, "augmented_inputs", counting)
    seen = []
    original = CoLLAT.audio_tokens_from_fbank

    def recording(self, fbank):
        seen.append(fbank.detach().clone())
        return original(self, fbank)

    monkeypatch.setattr(CoLLAT, "audio_tokens_from_fbank", recording)
    torch.manual_seed(0)
    model = CoLLAT(model_config())
    eval_set = ToneDataset(4, seed=1)
    result = run(model.config, train_config(tmp_path, steps=2, evaluate=True, eval_batch_size=4),
                 train_dataset=ToneDataset(), eval_sets={"tones": eval_set}, model=copy.deepcopy(model))
    assert result["status"] == "completed" and calls == [0, 1]
    clean = model.frontend(torch.stack([eval_set[i]["wave"] for i in range(4)]))
    evaluated = [fb for fb in seen if fb.shape[0] == 4]  # training passes hold 4 clips + 2 noisy twins
    assert len(evaluated) == 4  # untrained and trained, clean and noisy
    assert sum(torch.equal(fb, clean) for fb in evaluated) == 2  # the clean passes: the clips as they are


# ------------------------------------------------------------------------------------------ compile, fp8
@pytest.mark.slow
def test_compiled_model_trains_one_step_like_the_eager_model():
    torch.manual_seed(0)
    eager = CoLLAT(model_config())
    compiled = copy.deepcopy(eager)
    compiled.compile_for_training("default", backend="aot_eager")  # dynamo + AOT autograd, no codegen: fast
    batch = batch_of(4)
    results = []
    for model in (eager, compiled):
        torch.manual_seed(1)
        out = model.compute_losses(batch["wave"], batch["text"])
        out["loss"].backward()
        results.append((out, model.interaction.head.weight.grad.clone()))
    for key in ("loss", "l_ct", "l_cg", "l_ut"):
        torch.testing.assert_close(results[1][0][key], results[0][0][key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-3, atol=1e-5)
    assert sorted(compiled.state_dict()) == sorted(eager.state_dict())  # checkpoints keep their names
    with pytest.raises(ValueError, match="compile mode"):
        eager.compile_for_training("max-speed")


def test_fp8_refuses_clearly_without_cuda():
    model = CoLLAT(model_config())
    with pytest.raises(RuntimeError, match="fp8 training needs a CUDA GPU"):
        model.prepare_training("none", fp8=True)


@pytest.mark.gpu
def test_ast_attention_uses_a_fused_sdpa_backend_at_the_paper_shape():
    """AST-base at 1024 frames: 1214 tokens, head dim 64, bf16 -- flash, cuDNN or memory-efficient SDPA
    must serve it forward and backward (math is not allowed in the restricted context)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from collat.model.audio import ASTEncoder

    encoder = ASTEncoder(512, 1024, "base").cuda()
    config = encoder.ast.config
    assert config.hidden_size // config.num_attention_heads == 64 and encoder.num_tokens + 2 == 1214
    fbank = torch.randn(2, 1024, 128, device="cuda")
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = encoder(fbank)
        out.float().square().mean().backward()
    assert out.shape == (2, 1212, 512) and torch.isfinite(encoder.proj.weight.grad).all()


@pytest.mark.gpu
def test_one_training_step_without_host_sync():
    """Augmentation, forward, losses, backward, clipping and the optimizer step on a GPU under
    torch.cuda.set_sync_debug_mode("error") (after one warm-up step for lazy initialisation)."""
    from collat.model import CoLLATConfig

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = CoLLAT(CoLLATConfig(audio_size="micro", clip_seconds=0.5, interaction_depth=2, interaction_heads=6,
                                context_length=24, noisy_fraction=0.5, fused=True)).to(device)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    batch = batch_of(8)
    cfg = config(mixup=0.5, noise_augment=0.5)

    def step(index):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**augmented_inputs(batch, index, cfg, device))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
        optimizer.step()
        return out

    step(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step(1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out["loss"]).item()
