"""The one collate function keeps every field of the items, in order."""
import numpy as np
import pytest
import torch

from collat.data.collate import collate


def test_collate_stacks_waves_and_labels_and_keeps_texts_and_names():
    items = [{"wave": np.full(4, i, np.float32), "labels": torch.tensor([i, 1 - i], dtype=torch.float32),
              "text": f"clip {i}", "names": ["violin"] if i == 0 else ["flute", "drum"]} for i in range(2)]
    batch = collate(items)
    assert torch.equal(batch["wave"], torch.tensor([[0.0] * 4, [1.0] * 4]))
    assert torch.equal(batch["labels"], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert batch["text"] == ["clip 0", "clip 1"]
    assert batch["names"] == [["violin"], ["flute", "drum"]]


def test_collate_without_names_gives_empty_lists_and_refuses_an_empty_batch():
    batch = collate([{"wave": np.zeros(2, np.float32), "labels": np.zeros(1, np.float32), "text": "x"}])
    assert batch["names"] == [[]]
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
