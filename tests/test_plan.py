"""The training plan: label schedules of the three kinds, re-plans that keep the learning rate continuous,
the time budget, and the checkpoint's ``plan`` both ways."""

import pytest

from sela.plan import Plan
from sela.schedule import label_schedule, min_label_gap, space_out


def plan(**kw) -> Plan:
    settings = dict(
        epochs=4, steps_per_epoch=10, base_lr=0.1, warmup_steps=5, label_updates=5, label_share=0.5
    )
    return Plan(**{**settings, **kw})


def test_pass_schedule_is_the_spaced_out_label_schedule():
    p = plan(label_spacing="linear")
    gap = min_label_gap(p.pass_epochs, 10, 0.5)
    assert p.label_steps == space_out(label_schedule(5, 40, "linear"), gap) == [0, 8, 16, 24, 32]
    assert p.label_epochs == [] and not any(p.final_pass(e) for e in range(4))
    assert [p.passes_before(e) for e in range(4)] == [2, 1, 1, 1]  # steps 0 and 8 in epoch 0


def test_recorded_schedule_holds_one_pass_then_epoch_ends():
    p = plan(label_spacing="linear", label_inputs="recorded")
    assert p.label_steps == [0] and p.label_epochs == [1, 2, 3, 4]
    assert [p.records(e) for e in range(4)] == [True, True, True, True]


def test_online_labels_get_no_label_step_but_one_pass_after_the_last_epoch():
    p = plan(labels_at_end=True)
    assert p.label_steps == [] and p.label_epochs == []
    assert [p.final_pass(e) for e in range(4)] == [False, False, False, True]
    p.replan(2, 6)  # a longer budget: the final pass moves to the new last epoch
    assert p.label_steps == [] and [p.final_pass(e) for e in range(6)] == [False] * 5 + [True]


def test_replan_keeps_the_learning_rate_continuous_and_re_lays_the_schedule():
    p = plan()
    at_20 = p.lr_at(20)
    p.last_label_step = 10
    p.replan(2, 8)  # after 2 epochs, 8 instead of 4
    assert p.lr_anchor == (20, pytest.approx((20 - 5) / (40 - 5)))
    assert p.lr_at(20) == pytest.approx(at_20) and p.total_steps == 80
    assert p.lr_at(79) < p.lr_at(40) < at_20  # decays to the new end
    gap = min_label_gap(p.pass_epochs, 10, 0.5)
    assert p.label_steps == space_out([s for s in label_schedule(5, 80) if s >= 20], gap, after=10)


def test_fit_budget_replans_from_measured_times_and_says_when_the_first_epoch_took_it_all():
    p = plan(time_limit_s=100.0)
    p.epoch_times = [10.0]
    stats = {"time_s": 10.0, "label_time_s": 2.0, "label_passes": 1}
    assert p.fit_budget(1, stats) is None and p.epochs == 10  # 90 s left at 10 s per epoch
    assert p.pass_epochs == pytest.approx(2.0 / 8.0)  # the measured pass cost: 2 s per 8 s of training
    short = plan(time_limit_s=5.0)
    short.epoch_times = [10.0]
    note = short.fit_budget(1, {**stats, "label_passes": 0})
    assert short.epochs == 1 and "first epoch took 10 s of the 5 s budget" in note


def test_unknown_schedule_names_are_rejected():
    with pytest.raises(ValueError, match="lr schedule"):
        plan(lr_schedule="exp")
    with pytest.raises(ValueError, match="label spacing"):
        plan(label_spacing="cubic")


def test_state_dict_round_trip_and_old_plans_without_the_newer_keys():
    p = plan(time_limit_s=60.0)
    p.replan(1, 6)
    p.epoch_times, p.last_label_step, p.pass_epochs = [9.5], 12, 0.5
    saved = p.state_dict()
    assert set(saved) == {"epochs", "lr_anchor", "label_steps", "label_epochs", "epoch_times",
                          "last_label_step", "pass_epochs"}  # fmt: skip
    again = plan()
    again.load_state_dict({**saved, "lr_anchor": list(saved["lr_anchor"])})  # JSON-like lists load too
    assert again.state_dict() == saved and again.lr_at(33) == p.lr_at(33)
    assert again.last_label_step == 12 and again.pass_epochs == 0.5  # a resumed budget spaces steps as before
    old = {k: v for k, v in saved.items() if k not in ("last_label_step", "pass_epochs")}  # format 2 plans
    fresh = plan()
    fresh.load_state_dict(old)
    assert fresh.last_label_step is None and fresh.pass_epochs == plan().pass_epochs
