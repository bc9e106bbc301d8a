"""Locked text encoders: entering f_t at the embedding level, pooling conventions, locking, errors."""
import pytest
import torch

from collat.model.text import CLIPTextEncoder, MiniLMTextEncoder, build_text_encoder
from collat.prompts import make_prompt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder(context_length=24)


@pytest.fixture(scope="module")
def clip():
    return CLIPTextEncoder("ViT-S-32-alt", seed=0)  # the smallest plain CLIP text tower (width 256): fast tests


PROMPTS = [make_prompt(["violin"]), make_prompt(["snare drum", "piano"]), make_prompt(["church organ", "bird tweet", "harp"])]


def test_prompt_template():
    assert make_prompt(["a"]) == "This is a sound of a"
    assert make_prompt(["a", "b"]) == "This is a sound of a and b"
    assert make_prompt(["a", "b", "c"]) == "This is a sound of a, b, and c"
    with pytest.raises(ValueError):
        make_prompt([])


def test_minilm_tokenize_prefix_mask(minilm):
    ids, mask = minilm.tokenize(PROMPTS)
    assert ids.shape == mask.shape == (3, 24)
    lengths = mask.sum(1)
    for row, length in zip(mask, lengths):
        assert row[:length].all() and not row[length:].any()  # valid tokens form a prefix
    assert (ids[:, 0] == minilm.tokenizer.cls_token_id).all()


def test_longest_seen_prompt_fits_default_context(minilm):
    from collat.data.gm_sounds import HELDOUT_CLASSES, SEEN_CLASSES

    tok = minilm.tokenizer
    names = sorted(SEEN_CLASSES + HELDOUT_CLASSES, key=lambda n: len(tok(n)["input_ids"]), reverse=True)[:3]
    assert len(tok(make_prompt(names))["input_ids"]) <= minilm.context_length


def test_minilm_embedding_entry_matches_bert_forward(minilm):
    """f_t(E_t[ids]) with masked mean pooling == BertModel(input_ids) mean-pooled (sentence-transformers)."""
    ids, mask = minilm.tokenize(PROMPTS)
    ours = minilm.encode_text(ids, mask)
    with torch.no_grad():
        hidden = minilm.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    m = mask[..., None].float()
    expected = (hidden * m).sum(1) / m.sum(1)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_minilm_predicted_pooling_is_mean_over_all_positions(minilm):
    h = torch.randn(2, 24, minilm.width) * 0.05
    hidden = minilm.hidden_predicted(h)
    torch.testing.assert_close(minilm.encode_predicted(h), hidden.mean(1))


def test_minilm_related_prompts_are_closer(minilm):
    """The real pretrained weights are loaded: a synonym prompt beats an unrelated one."""
    ids, mask = minilm.tokenize(["This is a sound of a dog barking", "This is a sound of a puppy barking",
                                 "quarterly tax report spreadsheet"])
    z = torch.nn.functional.normalize(minilm.encode_text(ids, mask), dim=-1)
    assert z[0] @ z[1] > z[0] @ z[2] + 0.2


@pytest.mark.parametrize("which", ["minilm", "clip"])
def test_locked_but_differentiable(which, request):
    enc = request.getfixturevalue(which)
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    h = (torch.randn(2, enc.context_length, enc.width) * 0.05).requires_grad_()
    enc.encode_predicted(h).square().sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0  # gradients flow THROUGH f_t
    assert all(p.grad is None for p in enc.parameters())


def test_clip_embedding_entry_matches_open_clip(clip):
    """encode_text == open_clip's TextTransformer(ids): positional emb, causal transformer, ln_final, EOT pool, projection."""
    ids, mask = clip.tokenize(PROMPTS)
    assert ids.shape == (3, 77)
    with torch.no_grad():
        expected = clip.tower(ids)
    torch.testing.assert_close(clip.encode_text(ids, mask), expected, rtol=1e-5, atol=1e-5)


def test_clip_predicted_pooling_is_last_position_and_causal(clip):
    h = torch.randn(2, 77, clip.width) * 0.02
    hidden = clip.hidden_predicted(h)
    torch.testing.assert_close(clip.encode_predicted(h), hidden[:, -1] @ clip.tower.text_projection)
    h2 = h.clone()
    h2[:, -1] += 1.0  # a causal encoder: changing the last token leaves earlier positions untouched
    torch.testing.assert_close(clip.hidden_predicted(h2)[:, :-1], hidden[:, :-1])


def test_clip_local_checkpoint(clip, tmp_path):
    state = {k: v.clone() for k, v in clip.tower.state_dict().items()}
    state["visual.proj"] = torch.zeros(3)  # a full CLIP checkpoint also holds the image tower
    state["logit_scale"] = torch.tensor(4.6)
    path = tmp_path / "clip.pt"
    torch.save(state, path)
    other = CLIPTextEncoder("ViT-S-32-alt", checkpoint=str(path), seed=123)
    for k, v in clip.tower.state_dict().items():
        assert torch.equal(other.tower.state_dict()[k], v)
    with pytest.raises(FileNotFoundError):
        CLIPTextEncoder("ViT-S-32-alt", checkpoint=str(tmp_path / "missing.pt"))


def test_unknown_encoder_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown text encoder 'bert-huge'.*all-MiniLM-L6-v2.*clip:ViT-B-32"):
        build_text_encoder("bert-huge")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        build_text_encoder("clip:NoSuchModel")


def test_bad_texts_and_context(minilm):
    with pytest.raises(TypeError):
        minilm.tokenize("a single string")
    with pytest.raises(ValueError, match="shape"):
        minilm.forward_tokens(torch.zeros(1, 5, minilm.width))
    with pytest.raises(ValueError, match="context_length"):
        MiniLMTextEncoder(context_length=1)
