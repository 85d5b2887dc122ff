import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from sela.eval.metrics import (
    cluster_metrics,
    cluster_sizes,
    hungarian_accuracy,
    many_to_one_accuracy,
    topk_accuracy,
)


def test_hungarian_hand_computed():
    # Clusters are the classes renamed (0->1, 1->2, 2->0), with one mistake in six.
    pred = [1, 1, 2, 2, 0, 1]
    truth = [0, 0, 1, 1, 2, 2]
    assert hungarian_accuracy(np.array(pred), np.array(truth)) == pytest.approx(100 * 5 / 6)


def test_hungarian_more_clusters_than_classes():
    # 4 clusters, 2 classes: only two clusters can be matched, the others count as wrong.
    pred = np.array([0, 0, 1, 1, 2, 3])
    truth = np.array([0, 0, 0, 1, 1, 1])
    # Best one-to-one: 0->0 (2 right), then any of 1, 2, 3 -> 1 (1 right).
    assert hungarian_accuracy(pred, truth) == pytest.approx(100 * 3 / 6)


def test_hungarian_fewer_clusters_than_classes():
    pred = np.array([0, 0, 0, 1, 1, 1])
    truth = np.array([0, 0, 1, 2, 2, 2])
    assert hungarian_accuracy(pred, truth) == pytest.approx(100 * 5 / 6)


def test_hungarian_matches_brute_force_over_permutations():
    import itertools

    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, 60)
    truth = (pred + (rng.random(60) < 0.3) * rng.integers(1, 4, 60)) % 4
    best = max(np.mean(np.array(p)[pred] == truth) for p in itertools.permutations(range(4)))
    assert hungarian_accuracy(pred, truth) == pytest.approx(100 * best)


def test_torch_and_numpy_inputs_agree():
    pred = torch.tensor([0, 1, 1, 2, 2, 2])
    truth = torch.tensor([1, 0, 0, 2, 2, 0])
    assert hungarian_accuracy(pred, truth) == hungarian_accuracy(pred.numpy(), truth.numpy())
    assert cluster_metrics(pred, truth) == cluster_metrics(pred.numpy(), truth.numpy())


def test_many_to_one_hand_computed():
    pred = np.array([0, 0, 0, 1, 1, 2])
    truth = np.array([3, 3, 1, 1, 1, 1])
    # 0 -> 3, 1 -> 1, 2 -> 1: every sample but the third is right.
    assert many_to_one_accuracy(pred, truth) == pytest.approx(100 * 5 / 6)


def test_many_to_one_train_test_and_unseen_clusters():
    pred_train = np.array([0, 0, 1, 1])
    truth_train = np.array([2, 2, 0, 1])  # cluster 1 ties between 0 and 1: the smaller class wins
    pred_test = np.array([0, 1, 1, 5, 3])  # clusters 5 and 3 never seen in training: wrong
    truth_test = np.array([2, 0, 1, 5, 3])
    assert many_to_one_accuracy(pred_train, truth_train, pred_test, truth_test) == pytest.approx(100 * 2 / 5)


def test_many_to_one_needs_both_test_arrays():
    with pytest.raises(ValueError, match="both"):
        many_to_one_accuracy([0, 1], [0, 1], pred_test=np.array([0]))


def test_cluster_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 5, 300)
    pred = np.where(rng.random(300) < 0.6, truth, rng.integers(0, 7, 300))
    out = cluster_metrics(pred, truth)
    assert set(out) == {"nmi", "ami", "ari", "accuracy", "many_to_one", "n_empty"}
    assert out["nmi"] == pytest.approx(skm.normalized_mutual_info_score(truth, pred))
    assert out["ami"] == pytest.approx(skm.adjusted_mutual_info_score(truth, pred))
    assert out["ari"] == pytest.approx(skm.adjusted_rand_score(truth, pred))
    assert out["accuracy"] == pytest.approx(hungarian_accuracy(pred, truth))
    assert out["many_to_one"] == pytest.approx(many_to_one_accuracy(pred, truth))


def test_cluster_metrics_perfect_relabelled():
    truth = np.repeat(np.arange(4), 5)
    pred = (truth + 2) % 4
    out = cluster_metrics(pred, truth, n_clusters=6)
    assert out["nmi"] == pytest.approx(1.0)
    assert out["ari"] == pytest.approx(1.0)
    assert out["accuracy"] == pytest.approx(100.0)
    assert out["many_to_one"] == pytest.approx(100.0)
    assert out["n_empty"] == 2


def test_cluster_sizes_hand_computed():
    out = cluster_sizes(np.array([0, 0, 0, 1, 2, 2]), n_clusters=4)
    p = np.array([3, 1, 2]) / 6
    entropy = -(p * np.log(p)).sum()
    assert out["min"] == 0 and out["max"] == 3 and out["n_empty"] == 1
    assert out["entropy"] == pytest.approx(entropy)
    assert out["normalized_entropy"] == pytest.approx(entropy / math.log(4))


def test_cluster_sizes_balanced_has_entropy_log_k():
    out = cluster_sizes(torch.arange(12) % 3, n_clusters=3)
    assert out["min"] == out["max"] == 4
    assert out["entropy"] == pytest.approx(math.log(3))
    assert out["normalized_entropy"] == pytest.approx(1.0)


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.3, 0.3, 0.4]])
    out = topk_accuracy(scores, torch.tensor([1, 1, 0]))
    assert out["top1"] == pytest.approx(100 / 3)
    assert out["top5"] == pytest.approx(100.0)  # C = 3 <= 5: every class is in the top 5


@pytest.mark.parametrize(
    ("pred", "truth", "match"),
    [
        (np.array([0, 1]), np.array([0, 1, 1]), "same length"),
        (np.array([0.0, 1.0]), np.array([0, 1]), "integer"),
        (np.array([[0, 1]]), np.array([0, 1]), "1-D"),
        (np.array([], dtype=int), np.array([], dtype=int), "empty"),
        (np.array([-1, 1]), np.array([0, 1]), "negative"),
    ],
)
def test_bad_labels_raise(pred, truth, match):
    with pytest.raises(ValueError, match=match):
        hungarian_accuracy(pred, truth)


def test_cluster_sizes_rejects_ids_beyond_n_clusters():
    with pytest.raises(ValueError, match="n_clusters"):
        cluster_sizes(np.array([0, 5]), n_clusters=3)
