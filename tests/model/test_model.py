"""CoLLAT end to end on a micro config: gradients, locking, fused vs reference parity, persistence,
inference API, the fbank front end and input errors."""
import copy
import json
import math
import os

import pytest
import soundfile
import torch
import torch.nn.functional as F
import torchaudio

from collat.model import CoLLAT, CoLLATConfig
from collat.model.audio import num_patches

SR = 16000
TEXTS = ["This is a sound of violin", "This is a sound of snare drum and piano",
         "This is a sound of harp, flute, and bird tweet", "This is a sound of telephone ring"]


def micro_config(**overrides) -> CoLLATConfig:
    values = dict(audio_size="micro", clip_seconds=0.5, interaction_depth=1, interaction_heads=6,
                  context_length=24, fused=False, lambda_cg=1.0, lambda_ut=1.0)
    values.update(overrides)
    return CoLLATConfig(**values)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def template():
    torch.manual_seed(0)
    return CoLLAT(micro_config())


@pytest.fixture
def model(template):
    return copy.deepcopy(template)


@pytest.fixture(scope="module")
def waves():
    g = torch.Generator().manual_seed(1)
    t = torch.arange(SR // 2) / SR
    freqs = torch.tensor([220.0, 440.0, 880.0, 1760.0])[:, None]
    return torch.sin(2 * torch.pi * freqs * t) * 0.5 + 0.01 * torch.randn(4, SR // 2, generator=g)


def test_losses_and_gradient_routing(model, waves):
    out = model.compute_losses(waves, TEXTS)
    assert set(out) == {"loss", "l_ct", "l_cg", "l_ut", "logit_scale"}
    assert all(torch.isfinite(v) for v in out.values())
    assert out["l_ut"] > 0
    out["loss"].backward()
    ast_grad = model.audio.ast.embeddings.patch_embeddings.projection.weight.grad
    assert ast_grad is not None and ast_grad.abs().sum() > 0  # gradients reach the audio side
    assert model.logit_scale.grad is not None and model.interaction.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.text.parameters())  # ... and never the text encoder


def test_training_steps_overfit_and_leave_text_bit_identical(model, waves):
    model.config.lambda_cg, model.config.noisy_fraction = 0.1, 0.0  # the paper's weight; no L_ut noise
    before = model.locked_text_state()
    model.train()
    assert not model.text.training
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    history = []
    for _ in range(10):
        out = model.compute_losses(waves, TEXTS)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in out.items()})
    first, last = history[0], history[-1]
    assert last["loss"] < 0.8 * first["loss"], history
    assert last["l_ct"] < 0.8 * first["l_ct"] and last["l_cg"] < first["l_cg"], history
    after = model.locked_text_state()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fused_and_reference_same_losses_and_grads(model, waves):
    results = {}
    for fused in (True, False):
        model.set_fused(fused)
        model.zero_grad()
        torch.manual_seed(5)  # the same L_ut noise for both
        out = model.compute_losses(waves, TEXTS)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fused] = ({k: v.detach() for k, v in out.items()}, grads)
    for k in ("loss", "l_ct", "l_cg", "l_ut"):
        torch.testing.assert_close(results[True][0][k], results[False][0][k], rtol=1e-5, atol=1e-6)
    assert results[True][1].keys() == results[False][1].keys()
    # L1 losses have sign(diff) gradients: where a clean/noisy difference is ~0 (L_ut), a rounding-level
    # difference between the kernels flips a sign; and some gradients are exactly 0 in exact arithmetic
    # (attention key biases). So compare against the scale of the whole gradient, not element-wise.
    names = sorted(results[True][1])
    fused_all = torch.cat([results[True][1][n].flatten() for n in names])
    ref_all = torch.cat([results[False][1][n].flatten() for n in names])
    assert (fused_all - ref_all).norm() < 1e-3 * ref_all.norm()
    scale = ref_all.abs().max()
    for n in names:
        torch.testing.assert_close(results[True][1][n], results[False][1][n], rtol=0, atol=2e-3 * scale, msg=n)


def test_noise_knobs(model, waves):
    model.config.noisy_fraction = 0.0
    assert model.compute_losses(waves, TEXTS)["l_ut"] == 0
    model.config.noisy_fraction = 0.5
    model.config.stop_grad_clean = True
    assert model.compute_losses(waves, TEXTS)["l_ut"] > 0


def capture(module, store, key, what="output"):
    """A forward hook keeping a module's first input or its output (detached clones unless grads are wanted)."""
    def hook(mod, inputs, output):
        store[key] = inputs[0] if what == "input" else output
        if what == "output" and output.requires_grad:
            output.retain_grad()
    return module.register_forward_hook(hook)


def independent_losses(model, h_all, texts, B, k):
    """L_ct, L_cg, L_ut from the captured interaction output h_all [B + k, N, D], written out here: the
    oracle greedy matching, an explicit L1 sum, an explicit symmetric cross-entropy, the clamp at ln 100."""
    from collat.ops import reference

    ids, mask = model.text.tokenize(texts)
    h_t = model.text.embed(ids).float()
    h_at = h_all[:B].float()
    lengths = mask.sum(1)
    perm = reference.greedy_match(h_at.detach(), h_t, lengths)
    total = sum((h_at[b, perm[b, j]] - h_t[b, j]).abs().sum() for b in range(B) for j in range(int(lengths[b])))
    l_ct = total / (h_t.shape[-1] * int(lengths.sum()))
    z_t = F.normalize(model.text.encode_text(ids, mask).float(), dim=-1)
    z_a = F.normalize(model.text.encode_predicted(h_all[:B]).float(), dim=-1)
    scale = min(float(model.logit_scale.detach().exp()), 100.0)
    logits = scale * z_a @ z_t.T
    labels = torch.arange(B)
    l_cg = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    l_ut = (h_all[:k].float() - h_all[B:].float()).abs().mean() if k else torch.zeros(())
    return l_ct, l_cg, l_ut


def test_loss_wiring_matches_a_hand_computation(model, waves):
    """Each weight multiplies its own term, and each term is the formula of docs/design.md §2."""
    model.config.lambda_ct, model.config.lambda_cg, model.config.lambda_ut = 0.3, 0.7, 2.0
    model.config.noisy_fraction = 0.5
    store = {}
    handle = capture(model.interaction, store, "h_all")
    out = model.compute_losses(waves, TEXTS)
    handle.remove()
    assert store["h_all"].shape[0] == 6  # 4 clips + 2 twins in one pass
    l_ct, l_cg, l_ut = independent_losses(model, store["h_all"], TEXTS, B=4, k=2)
    torch.testing.assert_close(out["l_ct"], l_ct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["l_cg"], l_cg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["l_ut"], l_ut, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], 0.3 * l_ct + 0.7 * l_cg + 2.0 * l_ut, rtol=1e-5, atol=1e-6)


def test_logit_scale_is_capped_at_100_in_the_model(model, waves):
    model.config.noisy_fraction = 0.0
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))  # above the cap, as an optimizer step can leave it
    store = {}
    handle = capture(model.interaction, store, "h_all")
    out = model.compute_losses(waves, TEXTS)
    handle.remove()
    assert math.isclose(float(out["logit_scale"]), 100.0, rel_tol=1e-6)
    _, l_cg, _ = independent_losses(model, store["h_all"], TEXTS, B=4, k=0)
    torch.testing.assert_close(out["l_cg"], l_cg, rtol=1e-5, atol=1e-6)
    out["loss"].backward()
    assert model.logit_scale.grad == 0  # above the clamp the temperature gets no gradient
    probs = model.zero_shot(waves, ["violin", "piano"])
    cosine = model.zero_shot(waves, ["violin", "piano"], multi_label=True)
    torch.testing.assert_close(probs, (100.0 * cosine).softmax(dim=-1), rtol=1e-5, atol=1e-6)


def test_noisy_twins_pair_with_their_own_clips(model, waves):
    """With noise std 1e-6 a twin is its clip: L_ut ~ 0 when twins pair with the first k clips, and large
    if they were compared with any other clips (e.g. the last k)."""
    model.config.noisy_fraction, model.config.noise_std = 0.5, 1e-6
    store = {}
    handle = capture(model.interaction, store, "h_all")
    out = model.compute_losses(waves, TEXTS)
    handle.remove()
    h_all = store["h_all"].detach()
    wrong_pairing = (h_all[2:4] - h_all[4:]).abs().mean()
    assert wrong_pairing > 1e-2
    assert out["l_ut"] < 1e-3 * wrong_pairing


def test_twins_in_main_losses_match_a_hand_computation(model, waves):
    """twins_in_main_losses: the twins are matched with their clip's prompt in L_ct, and each picks its clip's
    prompt among the batch's in L_cg (audio -> text); the twin terms are weighted per row. Twins are made
    even with lambda_ut = 0."""
    from collat.ops import reference

    model.config.noisy_fraction, model.config.lambda_ut, model.config.twins_in_main_losses = 0.5, 0.0, True
    store = {}
    handle = capture(model.interaction, store, "h_all")
    out = model.compute_losses(waves, TEXTS)
    handle.remove()
    h_all = store["h_all"].float()
    assert h_all.shape[0] == 6 and out["l_ut"] == 0
    texts = TEXTS + TEXTS[:2]
    ids, mask = model.text.tokenize(texts)
    h_t, lengths = model.text.embed(ids).float(), mask.sum(1)
    perm = reference.greedy_match(h_all.detach(), h_t, lengths)
    total = sum((h_all[b, perm[b, j]] - h_t[b, j]).abs().sum() for b in range(6) for j in range(int(lengths[b])))
    torch.testing.assert_close(out["l_ct"], total / (h_t.shape[-1] * int(lengths.sum())), rtol=1e-5, atol=1e-6)
    z_t = F.normalize(model.text.encode_text(ids[:4], mask[:4]).float(), dim=-1)
    z_a = F.normalize(model.text.encode_predicted(store["h_all"]).float(), dim=-1)
    logits = model.logit_scale.exp() * z_a @ z_t.T  # [6, 4]
    clean = (F.cross_entropy(logits[:4], torch.arange(4)) + F.cross_entropy(logits[:4].T, torch.arange(4))) / 2
    twins = F.cross_entropy(logits[4:], torch.arange(2))
    torch.testing.assert_close(out["l_cg"], (4 * clean + 2 * twins) / 6, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stop_grad_clean", [True, False])
def test_stop_grad_clean_blocks_l_ut_gradient_to_the_clean_branch(model, waves, stop_grad_clean):
    model.config.lambda_ct, model.config.lambda_cg, model.config.lambda_ut = 0.0, 0.0, 1.0
    model.config.noisy_fraction, model.config.stop_grad_clean = 0.5, stop_grad_clean
    store = {}
    handle = capture(model.interaction, store, "h_all")
    model.compute_losses(waves, TEXTS)["loss"].backward()
    handle.remove()
    grad = store["h_all"].grad  # rows: 4 clips, then the twins of clips 0 and 1
    assert grad[4:].abs().sum() > 0 and grad[2:4].abs().sum() == 0
    if stop_grad_clean:
        assert grad[:2].abs().sum() == 0
    else:
        torch.testing.assert_close(grad[:2], -grad[4:])  # d|a - b|/da = -d|a - b|/db


@pytest.mark.parametrize("domain", ["waveform", "fbank"])
def test_l_ut_noise_lands_in_the_configured_domain(model, waves, domain):
    """waveform: the front end gets the clips and then the twins, each twin its clip plus N(0, std^2) noise;
    fbank: the front end gets the clips only and the twins differ from their clips' fbanks by that noise."""
    model.config.noisy_fraction, model.config.noise_std, model.config.ut_noise_domain = 0.5, 0.1, domain
    store = {}
    handles = [capture(model.frontend, store, "wave", "input"), capture(model.audio, store, "fbank", "input")]
    out = model.compute_losses(waves, TEXTS)
    for handle in handles:
        handle.remove()
    assert out["l_ut"] > 0
    wave_in, fbank_in = store["wave"], store["fbank"]
    if domain == "waveform":
        assert wave_in.shape == (6, waves.shape[1])
        torch.testing.assert_close(wave_in[:4], waves)
        noise = wave_in[4:] - waves[:2]
        assert abs(float(noise.std()) - 0.1) < 0.005 and abs(float(noise.mean())) < 0.005
        torch.testing.assert_close(fbank_in, model.frontend(wave_in))  # one batched front-end pass
    else:
        assert wave_in.shape == waves.shape
        noise = fbank_in[4:] - fbank_in[:2]
        assert abs(float(noise.std()) - 0.1) < 0.005


def test_spec_masks_mask_twins_like_their_clips(model, waves):
    from collat.model.augment import SpecMasks

    model.config.noisy_fraction = 0.5
    masks = SpecMasks.draw(4, max_time=20, max_freq=30, generator=torch.Generator().manual_seed(3))
    fbanks = {}
    for key, spec_masks in (("masked", masks), ("plain", None)):
        store = {}
        handle = capture(model.audio, store, "fbank", "input")
        torch.manual_seed(7)  # the same L_ut noise in both runs
        model.compute_losses(waves, TEXTS, spec_masks=spec_masks)
        handle.remove()
        fbanks[key] = store["fbank"]
    in_time, in_freq = masks.with_twins(2).covered(*fbanks["plain"].shape[1:])
    covered = in_time[:, :, None] | in_freq[:, None, :]
    assert covered[:4].any() and torch.equal(covered[4:], covered[:2])  # a twin is masked like its clip
    expected = torch.where(covered, torch.full_like(fbanks["plain"], model.frontend.padding_value), fbanks["plain"])
    assert torch.equal(fbanks["masked"], expected)


def test_inference_api(model, waves):
    z = model.encode_audio(waves, batch_size=3)
    assert z.shape == (4, model.text.embed_dim)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(model.encode_audio(list(waves)), z)  # deterministic; a list of 1-D tensors too
    assert not torch.equal(model.encode_audio(waves, noise_std=0.1), z)
    zt = model.encode_text(TEXTS)
    torch.testing.assert_close(zt.norm(dim=-1), torch.ones(4))
    h_at = model.audio_to_text_tokens(waves)
    assert h_at.shape == (4, 24, model.text.width)
    assert model.conditioning(waves).shape == (4, 24, model.text.width)
    single = model.zero_shot(waves, ["violin", "piano", "harp"])
    torch.testing.assert_close(single.sum(1), torch.ones(4))
    multi = model.zero_shot(waves, ["violin", "piano", "harp"], multi_label=True)
    assert multi.shape == (4, 3) and (multi.abs() <= 1 + 1e-5).all()
    assert model.training  # the inference calls restore the mode they found
    with pytest.raises(ValueError):
        model.zero_shot(waves, [])


def test_encode_audio_from_files_resamples(model, waves, tmp_path):
    path16 = tmp_path / "a.wav"
    soundfile.write(path16, waves[0].numpy(), SR)
    torch.testing.assert_close(model.encode_audio([str(path16)]), model.encode_audio(waves[:1]), rtol=1e-4, atol=1e-4)
    path8 = tmp_path / "b.flac"
    soundfile.write(path8, torchaudio.functional.resample(waves[1], SR, 8000).numpy(), 8000)
    assert model.encode_audio([str(path8)]).shape == (1, model.text.embed_dim)
    with pytest.raises(FileNotFoundError):
        model.encode_audio([str(tmp_path / "missing.wav")])


def test_audio_input_errors(model):
    with pytest.raises(ValueError, match="sample_rate must be 16000"):
        model.frontend(torch.zeros(1, 8000), sample_rate=8000)
    with pytest.raises(ValueError, match=r"shape \[B, T\]"):
        model.frontend(torch.zeros(1, 2, 8000))
    with pytest.raises(ValueError, match="too short"):
        model.frontend(torch.zeros(1, 100))
    with pytest.raises(TypeError, match="floating-point"):
        model.frontend(torch.zeros(1, 8000, dtype=torch.int16))
    with pytest.raises(ValueError, match="shape"):
        model.encode_audio(torch.zeros(2, 2, 8000))
    with pytest.raises(ValueError, match="one prompt per wave"):
        model.compute_losses(torch.zeros(2, 8000), ["x"])


def test_patch_count():
    assert num_patches(1024) == 1212  # the paper's 12 x 101 for 10.24 s
    assert num_patches(400) == 12 * 39


def test_save_and_load_round_trip(model, waves, tmp_path):
    model.save_pretrained(str(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["README.md", "config.json", "model.safetensors", "tokenizer"]
    loaded = CoLLAT.from_pretrained(str(tmp_path / "ckpt"))
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    torch.testing.assert_close(loaded.encode_audio(waves), model.encode_audio(waves), rtol=0, atol=0)


def test_from_pretrained_errors(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        CoLLAT.from_pretrained(str(tmp_path / "nothing"))
    directory = tmp_path / "ckpt"
    model.save_pretrained(str(directory))
    payload = json.loads((directory / "config.json").read_text())

    def write(p):
        (directory / "config.json").write_text(json.dumps(p))

    write({**payload, "architecture": "CLAP"})
    with pytest.raises(ValueError, match="'CLAP' checkpoint"):
        CoLLAT.from_pretrained(str(directory))
    write({**payload, "format_version": 99})
    with pytest.raises(ValueError, match="version 99"):
        CoLLAT.from_pretrained(str(directory))
    write({**payload, "config": {**payload["config"], "interaction_depth": 2}})
    with pytest.raises(ValueError, match="does not match this CoLLAT architecture"):
        CoLLAT.from_pretrained(str(directory))
    write({**payload, "config": {**payload["config"], "no_such_field": 1}})
    with pytest.raises(ValueError, match="unknown CoLLATConfig fields"):
        CoLLAT.from_pretrained(str(directory))


def test_config_validation():
    with pytest.raises(ValueError, match="matching"):
        micro_config(matching="best").validate()
    with pytest.raises(ValueError, match="noisy_fraction"):
        micro_config(noisy_fraction=2.0).validate()
    with pytest.raises(ValueError, match="audio size"):
        CoLLAT(micro_config(audio_size="huge"))


def test_noisy_twins_are_spread_over_ranks_like_one_process():
    from collat.model import noisy_twin_count

    assert noisy_twin_count(0.25, 32) == 8
    assert noisy_twin_count(0.0, 32) == 0
    # 2 ranks x 2 clips at 0.25 must still make the single process's one twin, not round(0.5) = 0 each.
    assert [noisy_twin_count(0.25, 2, rank, 2) for rank in range(2)] == [1, 0]
    for fraction in (0.1, 0.25, 0.5, 1.0):
        for world in (1, 2, 3, 8):
            counts = [noisy_twin_count(fraction, 4, rank, world) for rank in range(world)]
            assert sum(counts) == round(fraction * 4 * world)
            assert max(counts) - min(counts) <= 1
