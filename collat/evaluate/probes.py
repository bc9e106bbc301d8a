"""Linear probes on a frozen model's features (paper Table 2): the paper's 1-layer transformer decoder
head on conditioning(audio), and sklearn's logistic regression on z_a."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ProbeDecoder(nn.Module):
    """The paper's linear-probe head: a 1-layer transformer decoder whose single learned query
    cross-attends to the frozen model's token features, then a linear classifier."""

    def __init__(self, memory_dim: int, memory_len: int, num_classes: int, dim: int = 128, num_heads: int = 4,
                 ff_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.memory_norm = nn.LayerNorm(memory_dim)
        self.memory_proj = nn.Linear(memory_dim, dim)
        self.memory_position = nn.Parameter(torch.randn(memory_len, dim) * 0.02)
        self.layer = nn.TransformerDecoderLayer(dim, num_heads, ff_dim, dropout, batch_first=True, norm_first=True)
        self.norm_out = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, memory: torch.Tensor) -> torch.Tensor:
        memory = self.memory_proj(self.memory_norm(memory)) + self.memory_position
        x = self.layer(self.query.expand(memory.shape[0], -1, -1), memory)
        return self.classifier(self.norm_out(x[:, 0]))


@dataclass
class ProbeTraining:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0


def decoder_probe(train_memory: torch.Tensor, train_labels: torch.Tensor, test_memory: torch.Tensor,
                  multi_label: bool, training: ProbeTraining = ProbeTraining()) -> torch.Tensor:
    """Train a ProbeDecoder (cross-entropy, or BCE for multi-label); return test scores [B, C].
    Seeded by training.seed without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(training.seed)
        return _train_decoder_probe(train_memory, train_labels, test_memory, multi_label, training)


def _train_decoder_probe(train_memory, train_labels, test_memory, multi_label, training):
    _, memory_len, memory_dim = train_memory.shape
    head = ProbeDecoder(memory_dim, memory_len, train_labels.shape[1])
    optimizer = torch.optim.AdamW(head.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    generator = torch.Generator().manual_seed(training.seed)
    targets = train_labels.float() if multi_label else train_labels.argmax(1)
    head.train()
    for _ in range(training.epochs):
        order = torch.randperm(train_memory.shape[0], generator=generator)
        for start in range(0, len(order), training.batch_size):
            index = order[start : start + training.batch_size]
            logits = head(train_memory[index])
            if multi_label:
                loss = F.binary_cross_entropy_with_logits(logits, targets[index])
            else:
                loss = F.cross_entropy(logits, targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    head.eval()
    with torch.no_grad():
        logits = torch.cat([head(test_memory[s : s + 256]) for s in range(0, test_memory.shape[0], 256)])
    return logits.sigmoid() if multi_label else logits.softmax(-1)


def logistic_probe(train_x: torch.Tensor, train_labels: torch.Tensor, test_x: torch.Tensor, multi_label: bool,
                   C: float = 1.0, seed: int = 0) -> torch.Tensor:
    """sklearn LogisticRegression on z_a; one binary model per class for multi-label. A class seen
    with only one value in training gets that training frequency as its constant score."""
    from sklearn.linear_model import LogisticRegression

    x_train, x_test = train_x.numpy().astype(np.float64), test_x.numpy().astype(np.float64)
    y = train_labels.numpy()
    scores = np.zeros((x_test.shape[0], y.shape[1]))
    if multi_label:
        for c in range(y.shape[1]):
            if y[:, c].min() == y[:, c].max():
                scores[:, c] = y[:, c].mean()
                continue
            model = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(x_train, y[:, c])
            scores[:, c] = model.predict_proba(x_test)[:, 1]
    else:
        target = y.argmax(1)
        if len(np.unique(target)) < 2:
            raise ValueError("the logistic-regression probe needs at least two classes in its training clips")
        model = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(x_train, target)
        scores[:, model.classes_] = model.predict_proba(x_test)
    return torch.from_numpy(scores)
