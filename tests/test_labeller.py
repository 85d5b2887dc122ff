import dataclasses
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs
from sklearn.exceptions import NotFittedError
from sklearn.metrics import adjusted_rand_score

from sela.labeller import LabelState, SelfLabeller
from sela.sinkhorn import assign

pytestmark = pytest.mark.usefixtures("one_thread")


FAST = {"epochs": 30, "n_label_updates": 15}


@pytest.fixture(scope="module")
def blobs():
    x, y = make_blobs(n_samples=600, centers=6, n_features=10, cluster_std=1.0, random_state=0)
    return x, y


@pytest.fixture(scope="module")
def fitted(blobs):
    return SelfLabeller(6, n_heads=2, seed=0, **FAST).fit(blobs[0])


def test_recovers_equal_size_blobs(blobs, fitted):
    x, y = blobs
    assert adjusted_rand_score(y, fitted.labels_) > 0.95
    assert adjusted_rand_score(y, fitted.predict(x)) > 0.95
    assert np.bincount(fitted.labels_, minlength=6).min() >= 90  # 100 per blob, balanced labels


def test_fitted_attributes(blobs, fitted):
    x, _ = blobs
    assert fitted.labels_.shape == (600,) and fitted.labels_.dtype == np.int64
    assert fitted.labels_per_head_.shape == (2, 600)
    assert fitted.best_head_ in (0, 1)
    np.testing.assert_array_equal(fitted.labels_, fitted.labels_per_head_[fitted.best_head_])
    assert len(fitted.heads_) == 2 and fitted.n_clusters_ == [6, 6]
    assert fitted.n_iter_ == FAST["epochs"]
    assert len(fitted.history_) == FAST["n_label_updates"] + 2  # initial + updates + final
    assert fitted.history_[-1]["epoch"] == FAST["epochs"]
    proba = fitted.predict_proba(x)
    assert proba.shape == (600, 6)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(fitted.predict(x), proba.argmax(axis=1))
    assert fitted.predict(x, head=1).shape == (600,)


def test_fit_predict_is_deterministic_and_takes_tensors(blobs):
    x, _ = blobs
    a = SelfLabeller(6, seed=3, **FAST).fit_predict(x)
    b = SelfLabeller(6, seed=3, **FAST).fit_predict(torch.as_tensor(x, dtype=torch.float32))
    np.testing.assert_array_equal(a, b)


def test_does_not_touch_the_global_rng(blobs):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    SelfLabeller(6, epochs=2, n_label_updates=0).fit(blobs[0])
    torch.testing.assert_close(torch.rand(3), expected)


def test_heads_with_different_k(blobs):
    x, _ = blobs
    model = SelfLabeller([3, 6], epochs=3, n_label_updates=1).fit(x)
    assert model.n_clusters_ == [3, 6]
    assert [h.out_features for h in model.heads_] == [3, 6]
    assert model.labels_per_head_[0].max() <= 2
    assert model.predict_proba(x, head=0).shape == (600, 3)


def test_equipartition_on_structureless_data():
    x = np.random.default_rng(0).standard_normal((400, 5))
    model = SelfLabeller(8, epochs=5, n_label_updates=2).fit(x)
    sizes = np.bincount(model.labels_, minlength=8)
    assert sizes.min() >= 40 and sizes.max() <= 60  # 50 each under an exact equipartition


def test_hidden_layer_option(blobs):
    x, y = blobs
    model = SelfLabeller(6, hidden_dim=32, seed=0, **FAST).fit(x)
    assert model.predict(x).shape == (600,)
    assert adjusted_rand_score(y, model.labels_) > 0.9


@pytest.mark.parametrize("method", ["predict", "predict_proba"])
def test_reading_before_fit_raises(method):
    with pytest.raises(NotFittedError, match="fit"):
        getattr(SelfLabeller(3), method)(np.zeros((4, 2)))


@pytest.mark.parametrize(
    ("x", "kwargs", "match"),
    [
        (np.zeros((0, 4)), {}, "empty"),
        (np.zeros(10), {}, "2-D"),
        (np.array([[0.0, np.nan], [1.0, 2.0], [3.0, 4.0]]), {"n_clusters": 2}, "NaN"),
        (np.ones((5, 3), dtype=bool), {"n_clusters": 2}, "real numbers"),
        (np.random.rand(5, 3), {"n_clusters": 6}, "fewer clusters"),
        (np.random.rand(5, 3), {"n_clusters": 1}, "at least 2"),
        (np.random.rand(5, 3), {"n_clusters": 2, "n_heads": 0}, "n_heads"),
        (np.random.rand(5, 3), {"n_clusters": [2, 3], "n_heads": 3}, "n_heads"),
        (np.random.rand(5, 3), {"n_clusters": 2, "lam": 0.0}, "lam"),
        (np.random.rand(5, 3), {"n_clusters": 2, "epochs": 0}, "epochs"),
    ],
)
def test_bad_input_raises(x, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfLabeller(**kwargs).fit(x)


def test_predict_checks_feature_count(blobs, fitted):
    with pytest.raises(ValueError, match="features"):
        fitted.predict(np.zeros((3, 4)))


def test_sklearn_estimator_api(blobs):
    from sklearn.base import clone

    model = SelfLabeller(4, n_heads=3, lam=10.0, epochs=7)
    params = model.get_params()
    assert params["n_clusters"] == 4 and params["n_heads"] == 3 and params["epochs"] == 7
    copy = clone(model).set_params(epochs=2, n_label_updates=0)
    assert copy.epochs == 2 and model.epochs == 7
    assert not hasattr(copy, "labels_")
    assert copy.fit(blobs[0]).labels_.shape == (600,)


def test_tiny_input():
    x = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    labels = SelfLabeller(2, epochs=5, n_label_updates=2).fit_predict(x)
    assert sorted(np.bincount(labels)) == [2, 2]
    assert labels[0] == labels[1] != labels[2] == labels[3]


def test_unbalanced_labels_warn_at_every_label_step_including_the_first():
    """Equal logits (a collapsed network): the solve converges but every argmax is cluster 0, whatever
    lambda; the first label step warns too (the swapped objective has only that one global step)."""
    state = LabelState(1, 200)
    with pytest.warns(UserWarning, match="label step 1, head 0 .*first labels.*3.9x its share"):
        assert state.relabel(0, torch.zeros(200, 4)).imbalance > 3.5  # nearly all in one of 4
    state.n_updates = 1
    with pytest.warns(UserWarning, match="label step 2, head 0: the largest cluster holds 3.9x"):
        state.relabel(0, torch.zeros(200, 4))
    assert state.balance == [pytest.approx(3.94, abs=0.01)]  # 197 of 200 in one of 4 (3 repaired)


def test_a_soft_plan_is_hardened_until_its_labels_are_balanced():
    """Near-equal logits varying along few directions (an untrained network): at lambda 25 the plan is
    balanced but too soft for its argmax to be; a larger lambda makes the hard labels follow the marginal,
    without a warning."""
    gen = torch.Generator().manual_seed(0)
    logits = 0.01 * torch.randn(2000, 2, generator=gen) @ torch.randn(2, 20, generator=gen)  # rank 2
    assert assign(logits.clone()).imbalance > 2.0  # the plain solve: unbalanced argmax
    state = LabelState(1, 2000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state.relabel(0, logits.clone())
    sizes = torch.bincount(state.labels[0], minlength=20)
    assert state.balance[0] <= 2.0 and int(sizes.max()) <= 2 * 100
    assert state.scalings[0] is not None and torch.isfinite(state.scalings[0]).all()


def _skewed(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(5, 8, generator=gen)
    sizes = [800, 400, 200, 100, 50]
    x = torch.cat([c + torch.randn(s, 8, generator=gen) for c, s in zip(centers, sizes, strict=True)])
    truth = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    return torch.log_softmax(x @ centers.T / 4, dim=1), truth


def test_relaxed_and_estimated_marginals_let_cluster_sizes_follow_the_data():
    logits, truth = _skewed()
    n = len(truth)
    sizes = {}
    for marginal in ("uniform", "relaxed", "estimated"):
        state = LabelState(1, n, marginal=marginal, relax=0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            state.relabel(0, logits.clone())
        sizes[marginal] = torch.bincount(state.labels[0], minlength=5)
    assert int(sizes["uniform"].max() - sizes["uniform"].min()) <= 0.05 * n / 5  # 305 ... 312 of 310
    assert int(sizes["relaxed"].max()) > 600 and int(sizes["relaxed"].min()) < 100  # near 800 ... 50
    assert int(sizes["uniform"].max()) < int(sizes["estimated"].max()) < int(sizes["relaxed"].max())
    with pytest.raises(ValueError, match="marginal"):
        LabelState(1, n, marginal="balanced")
    with pytest.raises(ValueError, match="relax"):
        LabelState(1, n, marginal="relaxed", relax=0.0)


def test_set_labels_writes_every_heads_labels_of_the_given_rows():
    state = LabelState(2, 6)
    state.set_labels(torch.tensor([4, 1]), torch.tensor([[3, 2], [5, 0]]))  # (H, b) for rows 4 and 1
    assert state.labels.tolist() == [[0, 2, 0, 0, 3, 0], [0, 0, 0, 0, 5, 0]]
    assert state.labels.dtype == torch.int64 and state.n_updates == 0  # not a label step


def test_a_stalled_warm_start_is_solved_again_cold(monkeypatch):
    """When the warm-started solve does not converge, the label step solves cold and keeps the better
    result, without a warning when that one converges."""
    import sela.labeller as labeller

    real = labeller.assign
    calls = []

    def flaky(logits, **kw):
        calls.append(kw.get("init") is not None)
        result = real(logits, **kw)
        if kw.get("init") is not None:  # the warm start "stalls"
            return dataclasses.replace(result, converged=False, error=0.5)
        return result

    logits = torch.randn(300, 6, generator=torch.Generator().manual_seed(0))
    state = LabelState(1, 300)
    state.relabel(0, logits.clone())
    monkeypatch.setattr(labeller, "assign", flaky)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = state.relabel(0, logits.clone())
    assert calls == [True, False] and result.converged
