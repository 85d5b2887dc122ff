"""The label-free signals on data whose answer is known, and the verdict drawn from them."""

import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

from sela.data import BatchAugment
from sela.eval.signals import (
    COLLAPSED_RANK,
    embed,
    head_agreement,
    knn_overlap,
    label_nmi,
    rankme,
    step_agreement,
    verdict,
    view_neighbour_agreement,
)


def equal_spectrum(n: int, d: int, r: int, seed: int = 0) -> torch.Tensor:
    """(n, d) features of rank r whose r singular values are equal."""
    g = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(n, r, generator=g)).Q  # (n, r) orthonormal columns
    right = torch.linalg.qr(torch.randn(d, r, generator=g)).Q  # (d, r)
    return 3.0 * left @ right.T


@pytest.mark.parametrize("r", [1, 2, 7, 16])
def test_rankme_of_rank_r_data_is_r(r):
    rank = rankme(equal_spectrum(500, 16, r))
    assert rank.rankme == pytest.approx(r, rel=1e-3) and rank.fraction == pytest.approx(r / 16, rel=1e-3)


def test_rankme_of_gaussian_rank_r_data_is_close_to_r_and_subsamples():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(30_000, 6, generator=g) @ torch.randn(6, 40, generator=g)  # rank 6 in 40 dimensions
    rank = rankme(z, max_rows=4_000, generator=g)
    assert 4.5 < rank.rankme <= 6.0 and rank.fraction == pytest.approx(rank.rankme / 40)
    assert rankme(z[:4_000]).rankme == pytest.approx(rank.rankme, rel=0.05)  # a subsample estimates it


def test_rankme_of_a_constant_embedding_is_one_and_of_zeros_zero():
    assert rankme(torch.ones(300, 8)).rankme == pytest.approx(1.0, abs=1e-4)
    assert rankme(torch.zeros(300, 8)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        rankme(torch.full((4, 3), float("nan")))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        rankme(torch.ones(5))


def test_label_nmi_matches_scikit_learn():
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, 12, (5_000,), generator=g)
    noisy = torch.where(
        torch.rand(5_000, generator=g) < 0.6, a % 7, torch.randint(0, 9, (5_000,), generator=g)
    )
    for x, y in ((a, noisy), (noisy, a), (a, a), (a % 2, a), (torch.zeros_like(a), a)):
        assert label_nmi(x, y) == pytest.approx(normalized_mutual_info_score(x.numpy(), y.numpy()), abs=1e-9)
    zeros = torch.zeros(10, dtype=torch.long)
    assert label_nmi(zeros, zeros) == 1.0 == normalized_mutual_info_score(zeros, zeros)


def test_agreement_of_identical_renamed_and_independent_labelings():
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 10, (100_000,), generator=g)
    renamed = torch.randperm(10, generator=g)[a]  # the same clusters under other names
    independent = torch.randint(0, 10, (100_000,), generator=g)
    assert step_agreement(a, a) == pytest.approx(1.0) and step_agreement(a, renamed) == pytest.approx(1.0)
    assert step_agreement(a, independent) < 0.001
    assert head_agreement(torch.stack([a, renamed, a])) == pytest.approx(1.0)
    pairs = (label_nmi(a, independent) + label_nmi(a, a) + label_nmi(a, independent)) / 3
    assert head_agreement(torch.stack([a, a, independent])) == pytest.approx(pairs)
    assert head_agreement(a[None]) is None  # one head: nothing to agree with


def test_labels_are_checked():
    with pytest.raises(ValueError, match="same length"):
        label_nmi(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        label_nmi(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="negative"):
        label_nmi(torch.tensor([0, -1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\(H, N\)"):
        head_agreement(torch.zeros(5, dtype=torch.long))


def test_knn_overlap_identical_independent_and_constant():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(600, 8, generator=g), torch.randn(600, 8, generator=g)
    assert knn_overlap(a, a, k=10, generator=g) == 1.0
    assert knn_overlap(a, 2 * a + 0, k=10, generator=g) == 1.0  # cosine: the scale does not matter
    assert knn_overlap(a, b, k=10, generator=g) < 0.05  # chance: 10 / 599 = 0.017
    # a constant embedding has no neighbours to keep: its exact ties are broken at random
    assert knn_overlap(torch.ones(600, 8), torch.ones(600, 8), k=10, generator=g) < 0.05
    with pytest.raises(ValueError, match="k must be"):
        knn_overlap(a[:5], a[:5], k=10)


class Pixels(nn.Module):
    """An 'embedding' of a view: its pixels made symmetric left-right; a horizontal flip changes nothing."""

    def forward_features(self, x):
        return (x + x.flip(-1)).flatten(1)


class Constant(nn.Module):
    def forward_features(self, x):
        return torch.ones(len(x), 5)


def test_view_agreement_of_an_embedding_that_ignores_the_augmentation_is_one():
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (300, 3, 8, 8), dtype=torch.uint8, generator=g)
    flips = BatchAugment(8, crop_scale=None, flip_p=0.5, jitter=None, grayscale_p=0.0)
    result = view_neighbour_agreement(Pixels(), images, augment=flips, generator=g, batch_size=64)
    assert result.embedding == 1.0 and result.raw_pixels < 0.8  # half the raw views are mirrored
    assert result.chance == pytest.approx(10 / 299)
    constant = view_neighbour_agreement(Constant(), images.split(100), augment=flips, generator=g)
    assert constant.embedding < 0.1  # chance, not a perfect score


def test_embed_keeps_the_order_and_the_mode():
    model = Pixels().train()
    images = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    out = embed(model, images, transform=lambda x: x.float(), batch_size=3)
    assert torch.equal(out, Pixels().forward_features(images.float())) and model.training


LEARNED = {"rankme": 38.2, "rankme_fraction": 38.2 / 96, "head_nmi": 0.55, "label_agreement": 0.93,
           "view_knn_overlap": 0.41, "raw_view_knn_overlap": 0.12, "largest_cluster_share": 0.02}  # fmt: skip


def test_the_verdict_of_a_run_that_learned():
    line, warning = verdict(LEARNED)
    assert line == (
        "verdict: learned — view neighbours 0.41 vs 0.12 on raw pixels, effective rank 38/96, heads agree "
        "0.55, labels stable 0.93"
    )
    assert warning is None
    line, _ = verdict({**LEARNED, "head_nmi": None, "label_agreement": None})  # one head, one label step
    assert line == "verdict: learned — view neighbours 0.41 vs 0.12 on raw pixels, effective rank 38/96"
    line, warning = verdict({**LEARNED, "view_knn_overlap": None, "raw_view_knn_overlap": None})
    assert line.startswith("verdict: undecided") and warning is None


@pytest.mark.parametrize(
    "change, kind, advice",
    [
        ({"view_knn_overlap": 0.13}, "learned little", "--epochs"),  # above raw pixels, but not clearly
        ({"view_knn_overlap": 0.036, "raw_view_knn_overlap": 0.025}, "learned little", "--epochs"),
        ({"view_knn_overlap": 0.02}, "learned little", "--epochs"),
        ({"rankme": COLLAPSED_RANK - 0.5}, "collapsed", "--lr"),
        ({"largest_cluster_share": 0.95}, "collapsed", "--lr"),
    ],
)
def test_the_verdict_warns_when_nothing_was_learned_or_the_run_collapsed(change, kind, advice):
    line, warning = verdict({**LEARNED, **change})
    assert line.startswith(f"verdict: {kind} — ") and "\n" not in warning
    assert advice in warning
