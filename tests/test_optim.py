"""Learning-rate schedules (HF semantics) and the optimizer config."""

import math

import ml_collections
import numpy as np
import pytest

from mmjax.train import optim


def optim_cfg(**kw):
    c = dict(lr=1e-3, schedule="cosine", warmup_ratio=0.1, min_lr_ratio=0.0, weight_decay=0.0, b1=0.9, b2=0.999,
             eps=1e-8, clip_norm=1.0)
    c.update(kw)
    return ml_collections.ConfigDict(c)


def lrs(cfg, total):
    s = optim.make_schedule(cfg, total)
    return np.array([float(s(i)) for i in range(total + 1)])


def test_cosine_warms_up_then_decays_to_the_floor():
    x = lrs(optim_cfg(min_lr_ratio=0.1), 20)   # warmup ceil(0.1 * 20) = 2 steps
    np.testing.assert_allclose(x[:3], [0.0, 5e-4, 1e-3], rtol=1e-6)
    assert np.all(np.diff(x[2:]) <= 1e-12)
    np.testing.assert_allclose(x[20], 1e-4, rtol=1e-5)
    mid = 2 + 9   # halfway through the cosine
    np.testing.assert_allclose(x[mid], 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)), rtol=1e-5)


@pytest.mark.parametrize("warmup", [0.0, 0.25])
def test_constant_schedule_holds_lr_after_warmup(warmup):
    x = lrs(optim_cfg(schedule="constant", warmup_ratio=warmup), 8)
    n = math.ceil(warmup * 8)
    np.testing.assert_allclose(x[n:], 1e-3, rtol=1e-7)
    if n:
        np.testing.assert_allclose(x[:n], 1e-3 * np.arange(n) / n, rtol=1e-6)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="constant"):
        optim.make_schedule(optim_cfg(schedule="linear_decay"), 10)
