import math

import numpy as np
import pytest
import torch

from sela.eval.knn import knn_accuracy, knn_classify

pytestmark = pytest.mark.usefixtures("one_thread")


def _brute_force(train, labels, test, k, temperature, n_classes):
    """Wu et al.'s weighted vote, one test sample at a time in plain Python."""
    out = []
    for q in test.tolist():
        qn = math.sqrt(sum(v * v for v in q))
        sims = []
        for row, label in zip(train.tolist(), labels.tolist(), strict=True):
            rn = math.sqrt(sum(v * v for v in row))
            sims.append((sum(a * b for a, b in zip(q, row, strict=True)) / (qn * rn), label))
        sims.sort(key=lambda t: -t[0])
        votes = [0.0] * n_classes
        for s, label in sims[:k]:
            votes[label] += math.exp(s / temperature)
        total = sum(votes)
        out.append([v / total for v in votes])
    return torch.tensor(out)


@pytest.mark.parametrize(("k", "chunk_size"), [(1, 7), (5, 3), (20, 100)])
def test_matches_brute_force(k, chunk_size):
    g = torch.Generator().manual_seed(0)
    train = torch.randn(40, 6, generator=g) * 3
    labels = torch.randint(0, 4, (40,), generator=g)
    test = torch.randn(11, 6, generator=g)
    scores = knn_classify(train, labels, test, k=k, temperature=0.1, n_classes=4, chunk_size=chunk_size)
    assert scores.shape == (11, 4)
    torch.testing.assert_close(scores, _brute_force(train, labels, test, k, 0.1, 4), atol=1e-5, rtol=1e-4)


def test_k_larger_than_n_is_clamped():
    g = torch.Generator().manual_seed(1)
    train, labels, test = torch.randn(8, 3, generator=g), torch.arange(8) % 2, torch.randn(4, 3, generator=g)
    scores = knn_classify(train, labels, test, k=200)
    torch.testing.assert_close(scores, _brute_force(train, labels, test, 8, 0.1, 2), atol=1e-5, rtol=1e-4)


def test_small_temperature_stays_finite():
    g = torch.Generator().manual_seed(2)
    train, labels, test = (
        torch.randn(30, 4, generator=g),
        torch.arange(30) % 3,
        torch.randn(5, 4, generator=g),
    )
    scores = knn_classify(train, labels, test, k=10, temperature=1e-3)
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(5))


def test_accuracy_on_separable_clusters_and_numpy_input():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((5, 16)) * 5
    y_train, y_test = np.repeat(np.arange(5), 30), np.repeat(np.arange(5), 10)
    x_train = centers[y_train] + rng.standard_normal((150, 16))
    x_test = centers[y_test] + rng.standard_normal((50, 16))
    out = knn_accuracy(x_train, y_train, x_test, y_test, k=10)
    assert out == {"top1": pytest.approx(100.0), "top5": pytest.approx(100.0)}


def test_accuracy_is_percent():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    test = torch.tensor([[1.0, 0.1], [1.0, 0.2], [0.1, 1.0], [1.0, 0.0]])
    out = knn_accuracy(train, labels, test, torch.tensor([0, 1, 1, 0]), k=1)
    assert out["top1"] == pytest.approx(75.0)


def test_large_bank_in_chunks():
    # A 50,000-row bank: each chunk holds a (chunk_size, 50,000) block, never (M, 50,000).
    g = torch.Generator().manual_seed(3)
    train = torch.randn(50_000, 16, generator=g)
    labels = torch.randint(0, 10, (50_000,), generator=g)
    test = torch.cat([train[:300], torch.randn(212, 16, generator=g)])
    scores = knn_classify(train, labels, test, k=200, temperature=0.01, chunk_size=128)
    assert scores.shape == (512, 10) and torch.isfinite(scores).all()
    # With a small T the exact match (similarity 1) dominates the vote of its own class.
    assert (scores[:300].argmax(dim=1) == labels[:300]).float().mean() > 0.95


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"k": 0}, "k must"), ({"temperature": 0.0}, "temperature"), ({"n_classes": 2}, "n_classes")],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        knn_classify(torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]), torch.randn(2, 3), **kwargs)


def test_dimension_mismatch_raises():
    with pytest.raises(ValueError, match="same model"):
        knn_classify(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 4))


def test_float_labels_raise():
    with pytest.raises(ValueError, match="integer"):
        knn_classify(torch.randn(5, 3), torch.zeros(5), torch.randn(2, 3))
