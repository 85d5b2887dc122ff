"""Tests for sela.eval.evaluate: the `sela eval` protocol on a hand-made model with known heads."""

import pytest
import torch
from torch import nn

from sela.data import EvalTransform, ImageSet, load_dataset
from sela.eval.evaluate import evaluate, format_report
from sela.eval.metrics import cluster_metrics, many_to_one_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")


class LookupModel(nn.Module):
    """Features: the pixels. Head 0 memorises the training set (perfect there, random on new images);
    head 1 is a nearest-class-mean classifier that merges classes 8 and 9 (good everywhere).
    So the best head on train (0) is not the best on test (1)."""

    def __init__(self, train: ImageSet, transform):
        super().__init__()
        self.n_clusters = [10, 10]
        self.feature_layers = ["pixels"]
        self.register_buffer("bank", transform(train.images).flatten(1))  # (N, D)
        self.register_buffer("truth", train.targets.clone())
        means = torch.stack([self.bank[train.targets == c].mean(0) for c in range(10)])  # (10, D)
        means[9] = means[8]
        self.register_buffer("means", means)

    def forward_features(self, x):
        return x.flatten(1)  # (B, D)

    def features_by_layer(self, x, layer):
        return x.flatten(1)[:, ::2]

    def forward_head(self, f):
        dist = torch.cdist(f, self.bank, compute_mode="donot_use_mm_for_euclid_dist")  # (B, N)
        seen = dist.min(dim=1).values < 1e-4
        gen = torch.Generator().manual_seed(0)
        random = torch.randint(0, 10, (f.shape[0],), generator=gen)
        memo = torch.where(seen, self.truth[dist.argmin(dim=1)], random)
        nearest = torch.cdist(f, self.means).argmin(dim=1)
        return [nn.functional.one_hot(memo, 10).float() * 5, nn.functional.one_hot(nearest, 10).float() * 5]


@pytest.fixture(scope="module")
def digits():
    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    transform = EvalTransform(8, mean=train.mean, std=train.std)
    return train, test, transform, LookupModel(train, transform)


def test_keys_and_head_chosen_on_the_training_split(digits):
    train, test, transform, model = digits
    labels = torch.stack(
        [train.targets, torch.randint(0, 10, (len(train),))]
    )  # head 0's labels are the truth
    result = evaluate(model, train, test, transform=transform, labels=labels, knn_k=20)
    for key in ("knn_top1", "knn_top5", "linear_top1", "nmi", "ami", "ari", "accuracy", "heads", "best_head"):
        assert key in result
    assert result["knn_top1"] > 90 and result["linear_top1"] > 90
    h0, h1 = result["heads"]
    assert h0["train"]["nmi"] == pytest.approx(1.0) and h0["test"]["nmi"] < h1["test"]["nmi"]
    # chosen on train, reported on test: no peeking at the test split
    assert result["best_head"] == 0 and result["split"] == "test"
    assert result["nmi"] == h0["test"]["nmi"] and result["accuracy"] == h0["test"]["accuracy"]
    # self-labels against the truth
    assert h0["self_labels"]["accuracy"] == pytest.approx(100.0) and h1["self_labels"]["nmi"] < 0.1
    assert h0["label_agreement"] == pytest.approx(100.0)


def test_many_to_one_is_fitted_on_train_and_applied_to_test(digits):
    train, test, transform, model = digits
    result = evaluate(model, train, test, transform=transform, linear=False, knn_k=20)
    pred_train = model.forward_head(transform(train.images).flatten(1))[1].argmax(1)
    pred_test = model.forward_head(transform(test.images).flatten(1))[1].argmax(1)
    expected = many_to_one_accuracy(pred_train, train.targets, pred_test, test.targets)
    h1 = result["heads"][1]
    assert h1["test"]["many_to_one"] == pytest.approx(expected)
    assert h1["test"]["nmi"] == pytest.approx(cluster_metrics(pred_test, test.targets)["nmi"])
    assert "linear_top1" not in result
    # merging classes 8 and 9 into one cluster costs one-to-one accuracy, and many-to-one too
    assert 80 < h1["test"]["accuracy"] < 95


def test_layer_and_forced_head(digits):
    train, test, transform, model = digits
    result = evaluate(model, train, test, transform=transform, layer="pixels", head=1, linear=False, knn_k=5)
    assert result["feature_dim"] == 96 and result["layer"] == "pixels"
    assert result["best_head"] == 1 and result["nmi"] == result["heads"][1]["test"]["nmi"]
    with pytest.raises(ValueError, match="--head 2 does not exist; the model has heads 0..1"):
        evaluate(model, train, test, transform=transform, head=2)
    with pytest.raises(ValueError, match="labels must be"):
        evaluate(model, train, test, transform=transform, labels=torch.zeros(2, 5, dtype=torch.long))


def test_untrained_heads_are_reported_not_scored(digits):
    train, test, transform, model = digits
    result = evaluate(model, train, test, transform=transform, untrained_heads=[0], linear=False, knn_k=5)
    assert result["heads"][0] == {"head": 0, "k": 10, "trained": False}
    assert result["best_head"] == 1
    assert "not in the checkpoint" in format_report(result)
    with pytest.raises(ValueError, match="not in the checkpoint"):
        evaluate(model, train, test, transform=transform, untrained_heads=[0], head=0)


def test_no_ground_truth_skips_supervised_metrics(digits):
    train, _, transform, model = digits
    unlabelled = ImageSet(images=train.images, mean=train.mean, std=train.std)
    result = evaluate(model, unlabelled, None, transform=transform)
    assert not {"knn_top1", "linear_top1", "nmi", "best_head"} & set(result)
    assert "no ground truth" in result["notes"][0]
    assert set(result["heads"][1]) == {"head", "k", "trained", "sizes"}
    assert "note: the training split has no ground truth" in format_report(result)


def test_no_test_split_scores_train_only(digits):
    train, _, transform, model = digits
    result = evaluate(model, train, None, transform=transform)
    assert "knn_top1" not in result and result["split"] == "train" and result["best_head"] == 0
    assert "no labelled test split" in result["notes"][0]


def test_format_report_has_a_row_per_head_and_split(digits):
    train, test, transform, model = digits
    labels = torch.stack([train.targets, train.targets])
    text = format_report(evaluate(model, train, test, transform=transform, labels=labels, linear=False))
    assert "kNN (k=200" in text and "linear probe" not in text
    rows = [line.split() for line in text.splitlines() if line.strip()[:2] in ("0 ", "0*", "1 ", "1*")]
    assert [(r[0], r[2]) for r in rows] == [
        (h, s) for h in ("0*", "1") for s in ("train", "test", "self-labels")
    ]
