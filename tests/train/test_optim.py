"""The optimizer's groups and the learning-rate schedule, against values computed by hand."""
import math

import pytest

from collat.model import CoLLAT
from collat.train.optim import DECAY_GROUP, build_optimizer, lr_schedule
from tests.helpers import model_config, train_config


@pytest.mark.parametrize("step, expected", [
    (0, 1 / 4), (1, 2 / 4), (3, 1.0),                     # linear warmup over 4 steps, reaching the peak at step 3
    (4, 1.0), (7, 0.5 * (1 + math.cos(math.pi * 3 / 6))),  # cosine over the remaining 6 steps
    (10, 0.0), (13, 0.0),                                  # 0 at the end, and after it (a resume past the end)
])
def test_lr_schedule_is_warmup_then_cosine_to_zero(tmp_path, step, expected):
    schedule = lr_schedule(train_config(tmp_path, steps=10, warmup_steps=4))
    assert schedule(step) == pytest.approx(expected, abs=1e-12)


def test_no_weight_decay_on_biases_norms_positions_and_the_temperature(tmp_path):
    model = CoLLAT(model_config())
    optimizer, _ = build_optimizer(model, train_config(tmp_path, weight_decay=0.05), model.logit_scale.device)
    names = {id(p): name for name, p in model.named_parameters()}
    decay = [names[id(p)] for p in optimizer.param_groups[DECAY_GROUP]["params"]]
    no_decay = [names[id(p)] for p in optimizer.param_groups[1 - DECAY_GROUP]["params"]]
    assert optimizer.param_groups[DECAY_GROUP]["weight_decay"] == 0.05
    assert optimizer.param_groups[1 - DECAY_GROUP]["weight_decay"] == 0.0
    assert "logit_scale" in no_decay and "logit_scale" not in decay
    params = dict(model.named_parameters())
    assert all(params[n].ndim >= 2 and "position_embeddings" not in n for n in decay)
    assert all(params[n].ndim < 2 or n == "logit_scale" or "position_embeddings" in n for n in no_decay)
    assert sorted(decay + no_decay) == sorted(n for n, p in params.items() if p.requires_grad)
