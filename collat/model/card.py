"""The model card (README.md) of a saved CoLLAT: what it is, its architecture, training data, results,
how to use it, its full config. huggingface_hub renders TEMPLATE (jinja) with `card_values`."""
from __future__ import annotations

import dataclasses
import json

CARD_NAME = "README.md"
CARD_KEYS = ("training_data", "results", "notes")

TEMPLATE = """---
{{ card_data }}
---

# CoLLAT audio encoder

A CoLLAT model (Contrastive Locked Language and Audio Tuning): an AST audio encoder and a token interaction
module trained to predict the token embeddings of a locked, pretrained text encoder, so that audio lands in
that text encoder's embedding space (zero-shot classification, retrieval, per-token text-encoder features).

## Architecture

{{ architecture_table }}

## Training data

{{ training_data }}

## Results

{{ results_table }}
{% if notes %}
{{ notes }}
{% endif %}
## Use

```python
from collat.model import CoLLAT

model = CoLLAT.from_pretrained("path/to/this/folder", device="cpu")
scores = model.zero_shot(["clip.wav"], ["dog barking", "rain", "violin"])  # [1, 3], rows sum to 1
embeddings = model.encode_audio(waves_48k, sample_rate=48000)                # [B, {{ embed_dim }}], L2-normalised
```

Audio is resampled to 16 kHz (`sample_rate=` for tensors; files carry their own rate); audio longer than
{{ clip_seconds }} s is cut into windows of that length whose results are averaged.

## Files

- `config.json`: checkpoint format version {{ format_version }}: the architecture of each encoder and the CoLLATConfig
- `model.safetensors`: every weight{% if has_tokenizer %}
- `tokenizer/`: the text encoder's tokenizer{% endif %}

## Configuration

```json
{{ config_json }}
```

## Citation

Amila Silva, Spencer Whitehead, Chris Lengerich, Hugh Leather. *CoLLAT: On Adding Fine-grained Audio
Understanding to Language Models using Token-Level Locked-Language Tuning.* NeurIPS 2023.
"""


def check_card(card: dict | None) -> dict:
    """The card values of save_pretrained(card=...), checked: only CARD_KEYS, of the right types."""
    if card is None:
        return {}
    if not isinstance(card, dict):
        raise TypeError(f"card must be a dict with keys among {CARD_KEYS}, got {type(card).__name__}")
    unknown = sorted(set(card) - set(CARD_KEYS))
    if unknown:
        raise ValueError(f"unknown card keys {unknown}; known: {list(CARD_KEYS)}")
    for key in ("training_data", "notes"):
        if card.get(key) is not None and not isinstance(card[key], str):
            raise TypeError(f"card[{key!r}] must be a str, got {type(card[key]).__name__}")
    if card.get("results") is not None and not isinstance(card["results"], dict):
        raise TypeError(f"card['results'] must be a dict, got {type(card['results']).__name__}")
    return dict(card)


def card_values(model, format_version: int, training_data: str | None = None, results: dict | None = None,
                notes: str | None = None) -> dict:
    config = model.config
    return {
        "architecture_table": architecture_table(model),
        "training_data": training_data or "Not recorded (give it with `save_pretrained(..., card={'training_data': ...})`).",
        "results_table": results_table(results) if results else "No results were recorded with this checkpoint.",
        "notes": notes,
        "embed_dim": model.text.embed_dim,
        "clip_seconds": f"{config.clip_seconds:g}",
        "format_version": format_version,
        "has_tokenizer": model.text.architecture().get("tokenizer") is not None,
        "config_json": json.dumps(dataclasses.asdict(config), indent=2),
    }


def architecture_table(model) -> str:
    config, text, ast = model.config, model.text, model.audio.ast.config
    trainable = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("text."))
    total = sum(p.numel() for p in model.parameters())
    rows = [
        ("text encoder (locked)", (f"`{config.text_encoder}`: width {text.width}, embedding {text.embed_dim}, "
                                   f"context {text.context_length} tokens")),
        ("audio encoder", (f"AST: layers {ast.num_hidden_layers}, width {ast.hidden_size}, {ast.patch_size}x"
                           f"{ast.patch_size} patches with stride {ast.time_stride}, {model.audio.num_tokens} patch tokens")),
        ("token interaction", f"blocks {config.interaction_depth}, heads {config.interaction_heads}"),
        ("audio input", f"16 kHz mono, {config.clip_seconds:g} s clips, 128-bin fbank ({config.window_type} window)"),
        ("parameters", f"{total / 1e6:.1f} M, of which {trainable / 1e6:.1f} M trained (the text encoder is locked)"),
    ]
    return "\n".join(["| part | |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows])


def results_table(results: dict) -> str:
    """A markdown table: {column: {metric: value}} gives one column per key; {metric: value} one column."""
    if all(isinstance(v, dict) for v in results.values()):
        columns = list(results)
        metrics = list(dict.fromkeys(m for column in results.values() for m in column))
        header = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        return "\n".join(header + [f"| {m} | " + " | ".join(_cell(results[c].get(m)) for c in columns) + " |"
                                   for m in metrics])
    return "\n".join(["| metric | value |", "|---|---:|"] + [f"| {m} | {_cell(v)} |" for m, v in results.items()])


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
