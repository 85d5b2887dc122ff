"""Schedules: label steps, learning rate, the time budget's re-plan (pure functions)."""

import math

import pytest

from sela.schedule import (
    even_epochs,
    label_epochs,
    label_pass_epochs,
    label_schedule,
    lr_at,
    min_label_gap,
    planned_epochs,
    schedule_progress,
    space_out,
)


def test_label_schedule_quadratic_dense_early():
    steps = label_schedule(5, 100, "quadratic")
    assert steps == [0, 4, 16, 36, 64]
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    assert gaps == sorted(gaps)  # spacing grows: dense early


def test_label_schedule_linear_and_merging():
    assert label_schedule(4, 100, "linear") == [0, 25, 50, 75]
    assert label_schedule(1, 10) == [0]
    merged = label_schedule(50, 10, "quadratic")  # more updates than steps: collisions merge
    assert merged[0] == 0 and len(merged) == len(set(merged)) <= 10


@pytest.mark.parametrize(
    "bad", [dict(n_updates=0, total_steps=10), dict(n_updates=3, total_steps=10, spacing="cubic")]
)
def test_label_schedule_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        label_schedule(**bad)


def test_lr_warmup_cosine_and_step():
    kw = dict(base_lr=1.0, warmup_steps=10)
    assert lr_at(0, 110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(9, 110, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(10, 110, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(60, 110, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_at(109, 110, schedule="cosine", **kw) < 0.01
    assert lr_at(70, 110, schedule="step", **kw) == pytest.approx(0.1)
    assert lr_at(100, 110, schedule="step", **kw) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        lr_at(0, 10, base_lr=1.0, schedule="linear", warmup_steps=0)


def test_lr_anchor_continues_the_decay_to_the_new_end():
    kw = dict(base_lr=1.0, warmup_steps=10, schedule="cosine")
    # the plan was 110 steps; at step 60 (half the decay) it becomes 210 steps
    anchor = (60, schedule_progress(60, 110, warmup_steps=10))
    assert anchor[1] == pytest.approx(0.5)
    assert lr_at(60, 210, anchor=anchor, **kw) == pytest.approx(lr_at(60, 110, **kw))  # continuous
    assert lr_at(135, 210, anchor=anchor, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_at(209, 210, anchor=anchor, **kw) < 0.001  # reaches 0 at the new end
    assert lr_at(500, 210, anchor=anchor, **kw) == pytest.approx(0.0)  # clamped, never back up
    assert lr_at(5, 210, anchor=anchor, **kw) == pytest.approx(0.6)  # warm-up unchanged


def test_planned_epochs_fill_the_budget():
    assert planned_epochs(2, [10.0, 10.0], 100.0) == 10  # 80 s left at 10 s per epoch
    # 100 s left at the median 20 s, less 10 s kept for an epoch as slow as the slowest recent one (30 s)
    assert planned_epochs(3, [10.0, 30.0, 20.0], 160.0) == 3 + 4
    assert (
        planned_epochs(3, [10.0, 30.0, 20.0], 170.0) == 3 + 5
    )  # 110 s left: 4 epochs of 20 s and one of 30 s
    assert planned_epochs(5, [10.0] * 5, 40.0) == 5  # budget spent: the run stops
    # the median of the last five ignores an outlier epoch (e.g. one with a long label step)
    assert planned_epochs(6, [100.0, 10.0, 10.0, 10.0, 10.0, 10.0], 250.0) == 6 + 10


def test_label_epochs_round_steps_up_to_epoch_ends():
    assert label_epochs([0, 3, 6, 7, 8], steps_per_epoch=4) == [1, 2]  # the step-0 update is not moved
    assert label_epochs(label_schedule(5, 50, "linear"), steps_per_epoch=10) == [1, 2, 3, 4]
    assert label_epochs([0], steps_per_epoch=4) == []


def test_even_epochs_spread_updates_over_the_run():
    assert even_epochs(10, 3) == {0, 2, 5, 8}  # the random heads' labels at 0, then 3 evenly spaced
    assert even_epochs(2, 10) == {0, 1, 2}  # collisions merge


def test_label_gap_bounds_the_share_of_label_passes():
    p = label_pass_epochs(32, 16)  # a pass at 32 px, training views at 16 px
    assert p == pytest.approx(4 / 3)
    gap = min_label_gap(p, steps_per_epoch=100, share=0.15)
    assert p / (p + gap / 100) <= 0.15 + 1e-9  # a pass per gap costs at most 15 %
    assert p / (p + (gap - 1) / 100) > 0.15  # and the gap is the smallest that does
    with pytest.raises(ValueError, match="label share"):
        min_label_gap(p, 100, share=1.5)


def test_space_out_merges_crowded_steps_and_respects_the_last_one():
    assert space_out([0, 1, 4, 9, 16, 25], 5) == [0, 9, 16, 25]
    assert space_out([10, 12, 20], 5, after=8) == [20]  # 10 and 12 are too close to the step at 8
    assert space_out([], 3) == []
