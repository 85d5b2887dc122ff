"""Tests for sela.models.registry's ``clusters_per_head``: the clusters setting expanded to K per head."""

import pytest

from sela.models import clusters_per_head


def test_one_k_is_repeated_for_every_head():
    assert clusters_per_head([10], 4) == [10, 10, 10, 10]
    assert clusters_per_head([128], 1) == [128]


def test_one_k_per_head_is_kept_as_a_new_list():
    clusters = [10, 20, 30]
    out = clusters_per_head(clusters, 3)
    assert out == [10, 20, 30] and out is not clusters


@pytest.mark.parametrize(
    ("clusters", "heads", "message"),
    [
        ([10, 20, 30], 2, "clusters lists 3 values for 2 heads; give one or 2"),
        ([10, 20], 3, "clusters lists 2 values for 3 heads; give one or 3"),
        ([], 2, "clusters lists 0 values for 2 heads; give one or 2"),
        ([10], 0, "heads must be an integer >= 1, got 0"),
        ([10], True, "heads must be an integer >= 1"),
    ],
)
def test_a_mismatch_names_the_fix(clusters, heads, message):
    with pytest.raises(ValueError, match=message):
        clusters_per_head(clusters, heads)
