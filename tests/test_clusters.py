"""Tests for sela.clusters: OT k-means against KMeans, the K scan, the balance line and its warning."""

import inspect
import warnings

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import normalized_mutual_info_score as nmi
from sklearn.preprocessing import normalize

import sela.clusters as clusters
from sela.clusters import (
    OTKMeans,
    balance,
    balance_lines,
    format_scan,
    kmeans_plus_plus,
    parse_k_list,
    scan_k,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ot_kmeans_scores_at_least_kmeans_on_balanced_blobs():
    """Equal-sized, overlapping blobs (the benchmark's, smaller): mean NMI over four draws at least that of
    KMeans(n_init=10) on the same (centred, unit) rows; measured 0.9738-0.9750 over seeds 0-3 against 0.9723."""
    ours, theirs = [], []
    for draw in range(4):
        x, y = make_blobs(1000, n_features=16, centers=10, cluster_std=4.5, random_state=draw)
        fit = OTKMeans(10).fit(x)
        ours.append(nmi(y, fit.labels_))
        same = normalize(x - x.mean(0))
        theirs.append(nmi(y, KMeans(10, n_init=10, random_state=0).fit(same).labels_))
        sizes = np.bincount(fit.labels_, minlength=10)
        assert sizes.min() >= 98 and sizes.max() <= 102  # 100 each, as asked
        assert 0 < fit.confidence_.min() and fit.confidence_.max() <= 1 + 1e-6
    assert np.mean(ours) >= np.mean(theirs) and min(ours) > 0.94, (ours, theirs)


def test_ot_kmeans_is_seeded_and_assigns_new_rows_by_its_centroids():
    x, y = make_blobs(300, n_features=6, centers=3, cluster_std=1.0, random_state=0)
    a, b = OTKMeans(3, seed=5).fit(x), OTKMeans(3, seed=5).fit(x)
    assert np.array_equal(a.labels_, b.labels_) and a.inertia_ == b.inertia_
    assert nmi(a.labels_, a.assign(x)) == 1.0 and a.cluster_centers_.shape == (3, 6)
    assert np.allclose(np.linalg.norm(a.cluster_centers_, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="--k must be an integer from 2 to the 300"):
        OTKMeans(301).fit(x)
    with pytest.raises(Exception, match="not fitted"):
        OTKMeans(3).assign(x)


def test_centring_keeps_clusters_of_features_with_a_large_common_part():
    """Features far from the origin (all cosines ~1, as a barely trained network gives): centred first,
    the plan stays sharp and the clusters equal-sized; without centring the argmax labels are not."""
    x, y = make_blobs(400, n_features=8, centers=4, cluster_std=1.0, random_state=0)
    x = x + 500.0
    centred = OTKMeans(4).fit(x)
    assert nmi(y, centred.labels_) > 0.99 and np.bincount(centred.labels_).max() <= 102
    assert centred.confidence_.mean() > 0.9
    raw = OTKMeans(4, center=False).fit(x)
    assert raw.confidence_.mean() < 0.5  # the flat plan that centring avoids


def test_kmeans_plus_plus_spreads_the_first_centroids():
    x, _ = make_blobs(400, n_features=4, centers=8, cluster_std=0.1, random_state=1)
    xn = torch.nn.functional.normalize(torch.tensor(x - x.mean(0), dtype=torch.float32), dim=1)
    start = kmeans_plus_plus(xn, 8, torch.Generator().manual_seed(0))  # (8, D)
    nearest = (xn @ start.T).argmax(1)
    assert len(torch.unique(nearest)) == 8  # one centroid in each tight blob


def test_relax_is_passed_only_when_given(monkeypatch):
    real, seen = clusters.assign, []
    if "relax" not in inspect.signature(real).parameters:  # a solver without the relaxed marginal
        with pytest.raises(ValueError, match="no relaxed marginal yet"):
            OTKMeans(3, relax=1.0).fit(np.random.default_rng(0).normal(size=(30, 4)))

    def assign(logits, *, relax="not passed", **kwargs):  # one that takes relax=, recording it
        seen.append(relax)
        return real(logits, **kwargs)

    monkeypatch.setattr(clusters, "assign", assign)
    x, _ = make_blobs(90, n_features=4, centers=3, random_state=0)
    OTKMeans(3, n_init=1).fit(x)
    assert seen and set(seen) == {"not passed"}
    seen.clear()
    OTKMeans(3, n_init=1, relax=0.5).fit(x)
    assert seen and set(seen) == {0.5}
    with pytest.raises(ValueError, match="--relax must be a positive"):
        OTKMeans(3, relax=-1.0).fit(x)


def test_parse_k_list():
    assert parse_k_list("2,5,10") == [2, 5, 10]
    assert parse_k_list("2-5") == [2, 3, 4, 5]
    assert parse_k_list("5-20:5, 8,10") == [5, 8, 10, 15, 20]
    for bad in ("ten", "2", "1-4", "4-2", "2-x"):
        with pytest.raises(ValueError, match="--k-scan"):
            parse_k_list(bad)


def test_the_scan_recommends_the_number_of_blobs():
    x, _ = make_blobs(240, n_features=8, centers=8, cluster_std=2.0, random_state=0)
    scan = scan_k(torch.tensor(x, dtype=torch.float32), [4, 8, 12], n_init=2, progress=False)
    assert scan.best == 8 and scan.reason.startswith("K = 8: the highest silhouette x stability")
    by_k = {s.k: s for s in scan.scores}
    assert by_k[8].stability > 0.95 and by_k[8].silhouette > by_k[4].silhouette
    assert by_k[8].silhouette > by_k[12].silhouette and 0.9 < by_k[8].largest < 1.1
    text = format_scan(scan)
    assert len(text) == 5 and "<- recommended" in text[2] and text[-1].startswith("recommended K = 8")
    with pytest.raises(ValueError, match="half the 240 samples"):
        scan_k(torch.tensor(x, dtype=torch.float32), [2, 200], progress=False)


def test_balance_line_and_its_warning():
    even = np.repeat(np.arange(4), 25)  # 4 x 25
    b = balance(even, 4, name="head 0", confidence=np.full(100, 0.5))
    assert (b.smallest, b.median, b.largest, b.n_empty, b.share) == (25, 25.0, 25, 0, 25.0)
    assert b.line() == (
        "head 0: K = 4, sizes 25 / 25 / 25 (min / median / max), largest 1.00x its equal share 25.0, 0 empty, "
        "mean confidence 0.500"
    )
    skewed = np.array([0] * 70 + [1] * 20 + [2] * 10)  # K = 4: cluster 3 empty, 0 holds 2.8x its share
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lines = balance_lines(np.stack([even, skewed]), [4, 4])
    assert lines[1].startswith("head 1: K = 4, sizes 0 / 15 / 70") and "2.80x" in lines[1]
    assert len(caught) == 1 and "head 1: far from equal sizes (70 and 0 images" in str(caught[0].message)
    # the relaxed marginal asks for no equal sizes: only an empty cluster is far from what was asked
    for labels, warned in ((np.array([0] * 70 + [1] * 20 + [2] * 10), False), (skewed, True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            balance_lines(labels[None], [3 if not warned else 4], uniform=False)
        assert len(caught) == warned
    assert not balance(np.array([0] * 30 + [1] * 16 + [2] * 14), 3).far()  # 1.8x: not far
    assert balance(np.array([0] * 59 + [1] * 30 + [2] * 1), 3).far()  # smallest under a quarter


def test_empty_clusters_move_to_the_farthest_samples():
    x = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [-1.0, 0.1]]), dim=1)
    labels = torch.tensor([0, 0, 0, 0])  # clusters 1 and 2 empty
    centroids = clusters._centroids(x, labels, torch.zeros(3, 2))
    own = x @ centroids[0]
    far = own.argsort()[:2]  # the two samples least like cluster 0's mean
    assert torch.allclose(centroids[1:], x[far], atol=1e-6)  # one each, in order of distance


def test_the_relaxed_marginal_lets_sizes_follow_the_data():
    """Unequal blobs (400 .. 30): equal sizes split the large ones; rho = 1 follows the data (measured NMI
    0.946 / 0.924 against KMeans's 0.926 / 0.932 on two draws, equal sizes 0.745 / 0.753)."""
    x, y = make_blobs(
        [400, 300, 200, 150, 100, 80, 60, 40, 40, 30], n_features=16, cluster_std=3.5, random_state=0
    )
    equal = OTKMeans(10).fit(x)
    relaxed = OTKMeans(10, relax=clusters.DEFAULT_RELAX).fit(x)
    assert nmi(y, relaxed.labels_) > nmi(y, equal.labels_) + 0.1 and nmi(y, relaxed.labels_) > 0.9
    sizes = np.bincount(relaxed.labels_, minlength=10)
    assert sizes.max() > 2 * 140 and sizes.min() > 0  # the equal share is 140
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        balance_lines(relaxed.labels_[None], [10], uniform=False)  # uneven but asked for: no warning
    assert not caught
