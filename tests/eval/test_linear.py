import numpy as np
import pytest
import torch

from sela.eval.linear import linear_probe

pytestmark = pytest.mark.usefixtures("one_thread")


def _gaussians(n_train, n_test, d, n_classes, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, d, generator=g) * spread
    y_train = torch.randint(0, n_classes, (n_train,), generator=g)
    y_test = torch.randint(0, n_classes, (n_test,), generator=g)
    x_train = centers[y_train] + torch.randn(n_train, d, generator=g)
    x_test = centers[y_test] + torch.randn(n_test, d, generator=g)
    # Features on very different scales: the probe standardises them.
    scales = torch.logspace(-2, 2, d)
    return x_train * scales, y_train, x_test * scales, y_test


def test_separable_toy_is_solved():
    x_train, y_train, x_test, y_test = _gaussians(400, 200, 10, 4, spread=6.0, seed=0)
    out = linear_probe(x_train, y_train, x_test, y_test)
    assert out["top1"] == pytest.approx(100.0)
    assert out["top5"] == pytest.approx(100.0)
    assert out["weight_decay"] in (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
    assert set(out["val_top1"]) == {0.0, 1e-5, 1e-4, 1e-3, 1e-2}


def test_weight_decay_choice_never_looks_at_test_set():
    x_train, y_train, x_test, y_test = _gaussians(300, 200, 40, 5, spread=0.5, seed=1)
    wds = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
    ref = linear_probe(x_train, y_train, x_test, y_test, weight_decays=wds)
    assert len(set(ref["val_top1"].values())) > 1  # the candidates really differ
    g = torch.Generator().manual_seed(5)
    shuffled = y_test[torch.randperm(len(y_test), generator=g)]
    other = linear_probe(x_train, y_train, torch.randn(50, 40, generator=g), shuffled[:50], weight_decays=wds)
    assert other["weight_decay"] == ref["weight_decay"]
    assert other["val_top1"] == ref["val_top1"]


def test_deterministic_and_numpy_inputs():
    x_train, y_train, x_test, y_test = _gaussians(200, 100, 8, 3, spread=1.0, seed=2)
    a = linear_probe(x_train, y_train, x_test, y_test, weight_decays=(1e-3, 1e-2))
    b = linear_probe(
        x_train.numpy(), y_train.numpy(), x_test.numpy(), y_test.numpy(), weight_decays=(1e-3, 1e-2)
    )
    assert a == b


def test_single_weight_decay_skips_validation():
    x_train, y_train, x_test, y_test = _gaussians(100, 50, 5, 3, spread=4.0, seed=3)
    out = linear_probe(x_train, y_train, x_test, y_test, weight_decays=(1e-4,))
    assert out["weight_decay"] == 1e-4 and out["val_top1"] == {}
    assert 0.0 <= out["top1"] <= 100.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_decays": ()}, "weight_decays"),
        ({"weight_decays": (-1.0,)}, "weight_decays"),
        ({"val_fraction": 1.0}, "val_fraction"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    x = torch.randn(20, 3)
    y = torch.arange(20) % 2
    with pytest.raises(ValueError, match=match):
        linear_probe(x, y, x, y, **kwargs)


def test_bad_inputs_raise():
    x, y = torch.randn(20, 3), torch.arange(20) % 2
    with pytest.raises(ValueError, match="test_features"):
        linear_probe(x, y, torch.randn(4, 5), y[:4])
    with pytest.raises(ValueError, match="integer"):
        linear_probe(x, y.float(), x, y)
    with pytest.raises(ValueError, match="NaN"):
        linear_probe(torch.full((20, 3), np.nan), y, x, y)
