"""Schedules as pure functions of step counts: label steps, learning rate, a time budget's re-plan.

Steps are optimisation steps (0-based); epochs are 1-based where they name an epoch's end. Nothing here
keeps state: the trainer calls these with its plan (total steps, warm-up, the learning rate's anchor).
"""

from __future__ import annotations

import math

import numpy as np

LR_SCHEDULES = ("cosine", "step")
LABEL_SPACINGS = ("quadratic", "linear")


def label_schedule(n_updates: int, total_steps: int, spacing: str = "quadratic") -> list[int]:
    """Optimisation steps (0-based) before which labels are re-assigned; the first is always step 0.

    ``quadratic`` puts update i at total_steps * (i / n)^2 (dense early, the original ImageNet recipe),
    ``linear`` at total_steps * i / n (its CIFAR recipe). Collisions are merged, so at most n are returned.
    """
    if n_updates < 1:
        raise ValueError(f"label_updates must be >= 1 (the first assignment), got {n_updates}")
    if spacing not in LABEL_SPACINGS:
        raise ValueError(f"label spacing must be 'quadratic' or 'linear', got {spacing!r}")
    power = 2 if spacing == "quadratic" else 1
    steps = {int(total_steps * (i / n_updates) ** power) for i in range(n_updates)}
    return sorted(steps)


def label_epochs(steps: list[int], steps_per_epoch: int) -> list[int]:
    """Epochs (1-based) at whose end a recorded-output label step runs: scheduled step s > 0 moves to the
    first epoch boundary at or after it (epoch ceil(s / steps_per_epoch)); collisions are merged."""
    return sorted({-(-s // steps_per_epoch) for s in steps if s > 0})


def even_epochs(epochs: int, n_updates: int) -> set[int]:
    """Epochs (0-based) before which :class:`sela.labeller.SelfLabeller` re-assigns labels: epoch 0 (the
    labels of the random heads), then ``n_updates`` evenly spaced ones (rounded; collisions merge)."""
    return set(np.linspace(0, epochs, n_updates + 2).round().astype(int)[:-1].tolist())


def schedule_progress(
    step: int, total_steps: int, *, warmup_steps: int, anchor: tuple[int, float] | None = None
) -> float:
    """How far the decay after warm-up has come at ``step``: 0 at the end of warm-up, 1 at ``total_steps``.

    ``anchor`` = (s0, t0) says the progress was t0 at step s0 under an earlier plan (a time budget
    re-plans the run's length); from there it goes on linearly to 1 at the new ``total_steps``, so the
    learning rate stays continuous when the plan changes. Clamped to [0, 1].
    """
    start, t0 = anchor or (warmup_steps, 0.0)
    t = t0 + (1 - t0) * (step - start) / max(1, total_steps - start)
    return min(max(t, 0.0), 1.0)


def lr_at(
    step: int,
    total_steps: int,
    *,
    base_lr: float,
    schedule: str,
    warmup_steps: int,
    anchor: tuple[int, float] | None = None,
) -> float:
    """Learning rate at an optimisation step: linear warm-up, then cosine to 0 or steps of 0.1 at 50/75 %
    of the decay (its progress as :func:`schedule_progress`, ``anchor`` included)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be 'cosine' or 'step', got {schedule!r}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = schedule_progress(step, total_steps, warmup_steps=warmup_steps, anchor=anchor)
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * t))
    return base_lr * (0.1 ** (int(t >= 0.5) + int(t >= 0.75)))


def typical_epoch_s(times_s: list[float]) -> float:
    """An epoch's time for planning: the median of the last five epochs' times (seconds)."""
    recent = sorted(times_s[-5:])
    return recent[len(recent) // 2]


def planned_epochs(done: int, times_s: list[float], limit_s: float) -> int:
    """The run's length in epochs for a time budget: ``done`` epochs finished, which took ``times_s``
    seconds each, and as many more whole epochs as the rest of ``limit_s`` holds at the median of the last
    five epochs' times, less a reserve so that one of them may be as slow as the slowest of those five
    (the last epoch then overruns the budget only when it is slower still). ``done`` when no further epoch
    fits: the run stops (after its first epoch, when that alone took the budget)."""
    per_epoch = typical_epoch_s(times_s)
    remaining = limit_s - sum(times_s) - (max(times_s[-5:]) - per_epoch)
    return done + max(0, math.floor(remaining / max(per_epoch, 1e-9) + 1e-9))


LABEL_SHARE = 0.15  # the largest share of training time that label passes may take


def label_pass_epochs(eval_side: int, view_side: int) -> float:
    """A label pass's cost in training epochs, estimated from the sizes alone (so that a run's schedule
    does not depend on timing): a forward pass over every image at ``eval_side`` px, where a training step
    is a forward and a backward pass (about three forwards) at ``view_side`` px."""
    return (eval_side / view_side) ** 2 / 3


def min_label_gap(pass_epochs: float, steps_per_epoch: int, share: float = LABEL_SHARE) -> int:
    """The fewest optimisation steps between two label passes so that the passes take at most ``share``
    of the training time: a pass of p epochs after g steps of an epoch of S steps costs p / (p + g / S)."""
    if not 0 < share < 1:
        raise ValueError(f"the label share must be in (0, 1), got {share}")
    return max(1, math.ceil(pass_epochs * (1 - share) / share * steps_per_epoch))


def space_out(steps: list[int], min_gap: int, after: int | None = None) -> list[int]:
    """The scheduled ``steps`` (sorted) thinned so that consecutive ones are at least ``min_gap`` apart,
    starting ``min_gap`` after the step ``after`` (the last label step done, if any): a step too close to
    the previous kept one is merged into it (dropped)."""
    kept: list[int] = []
    last = after
    for s in steps:
        if last is None or s - last >= min_gap:
            kept.append(s)
            last = s
    return kept
