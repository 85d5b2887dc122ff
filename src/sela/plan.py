"""The training plan as data: the run's length, its learning rate and its label schedule.

A :class:`Plan` holds what :mod:`sela.schedule`'s pure functions need (the epochs, the steps per epoch,
the learning rate's anchor, the measured epoch times) and what they gave (the label steps); a time
budget re-plans it in place between epochs. Steps are optimisation steps (0-based); epochs are 0-based
where they index the epoch being trained and 1-based where they name an epoch's end (``label_epochs``).

Three kinds of label step: a pass over all images before an optimisation step (``label_steps``), a
relabel from the outputs recorded during an epoch, at its end (``label_epochs``, ``label_inputs=
"recorded"``), and, for objectives whose labels come online, one global pass after the last epoch
(``labels_at_end``; they get no label step during training).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sela.schedule import (
    LABEL_SHARE,
    label_epochs,
    label_schedule,
    lr_at,
    min_label_gap,
    planned_epochs,
    schedule_progress,
    space_out,
    typical_epoch_s,
)

_SAVED = (
    "epochs",
    "lr_anchor",
    "label_steps",
    "label_epochs",
    "epoch_times",
    "last_label_step",
    "pass_epochs",
)


@dataclass
class Plan:
    """The run's length and schedules (see the module docstring); laid out for step 0 when built.

    Args:
        epochs: the run's length (a time budget's first guess, then its re-plans).
        steps_per_epoch: optimisation steps per epoch (the last partial batch dropped).
        base_lr, lr_schedule, warmup_steps: the learning rate (:func:`sela.schedule.lr_at`).
        label_updates, label_spacing: label steps over the run (:func:`sela.schedule.label_schedule`).
        label_inputs: ``eval``/``train`` (a pass over the data per step) or ``recorded``.
        label_share: the largest share of the training time that label passes may take.
        pass_epochs: a label pass's cost in training epochs (estimated from sizes, then measured).
        labels_at_end: labels come online: no label step during training, one pass after the last epoch.
        time_limit_s: the wall-clock budget that re-plans ``epochs`` (None: fixed length).

    Attributes:
        lr_anchor: (step, progress) where a re-plan left the learning-rate decay, or None.
        label_steps: optimisation steps before which a label pass runs.
        label_epochs: epochs (1-based) after which a recorded label step runs.
        epoch_times: seconds per finished epoch (mean over ranks).
        last_label_step: the step of the last label pass done (a re-plan spaces the next from it).
    """

    epochs: int
    steps_per_epoch: int
    base_lr: float
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    label_updates: int = 40
    label_spacing: str = "quadratic"
    label_inputs: str = "eval"
    label_share: float = LABEL_SHARE
    pass_epochs: float = 1 / 3
    labels_at_end: bool = False
    time_limit_s: float | None = None
    lr_anchor: tuple[int, float] | None = None
    label_steps: list[int] = field(default_factory=list)
    label_epochs: list[int] = field(default_factory=list)
    epoch_times: list[float] = field(default_factory=list)
    last_label_step: int | None = None

    def __post_init__(self) -> None:
        self.lr_at(0)  # validates the schedule name
        self.lay_out(0)

    @property
    def total_steps(self) -> int:
        """Optimisation steps of the whole run as planned now."""
        return self.epochs * self.steps_per_epoch

    def lr_at(self, step: int) -> float:
        return lr_at(
            step,
            self.total_steps,
            base_lr=self.base_lr,
            schedule=self.lr_schedule,
            warmup_steps=self.warmup_steps,
            anchor=self.lr_anchor,
        )

    def lay_out(self, step: int) -> None:
        """The label schedule for the planned length, from optimisation step ``step`` on."""
        if self.labels_at_end:  # labels come online; one global step after the last epoch
            self.label_steps = []
            return
        steps = label_schedule(self.label_updates, self.total_steps, self.label_spacing)
        if self.label_inputs == "recorded":  # the first step needs a pass, the others an epoch's outputs
            self.label_epochs = [
                e for e in label_epochs(steps, self.steps_per_epoch) if e > step // self.steps_per_epoch
            ]
            self.label_steps = [0] if step == 0 else []
        else:  # every step a pass over the data: no closer together than the label share allows
            gap = min_label_gap(self.pass_epochs, self.steps_per_epoch, self.label_share)
            self.label_steps = space_out([s for s in steps if s >= step], gap, after=self.last_label_step)

    def replan(self, done: int, epochs: int) -> None:
        """Change the run's length to ``epochs`` after ``done`` finished epochs: the learning-rate decay
        continues from where it is to 0 at the new end, the label schedule is laid out again from here."""
        step = done * self.steps_per_epoch  # the next optimisation step
        start = max(step, self.warmup_steps)
        progress = schedule_progress(
            start, self.total_steps, warmup_steps=self.warmup_steps, anchor=self.lr_anchor
        )
        self.lr_anchor = (start, progress)
        self.epochs = epochs
        self.lay_out(step)

    def fit_budget(self, done: int, stats: dict) -> str | None:
        """Re-plan the length to the rest of the time budget after ``done`` epochs, the last of which gave
        ``stats`` (its label passes' measured cost replaces the estimated one). Returns what to tell the
        user when the budget stops the run after its first epoch, else None."""
        if self.label_inputs != "recorded" and stats["label_passes"]:
            train_s = max(stats["time_s"] - stats["label_time_s"], 1e-9)
            self.pass_epochs = stats["label_time_s"] / stats["label_passes"] / train_s
        epochs = planned_epochs(done, self.epoch_times, self.time_limit_s)
        if epochs != self.epochs:
            self.replan(done, epochs)
        if done != 1 or self.epochs > done:
            return None
        return (
            f"the first epoch took {stats['time_s']:.0f} s of the {self.time_limit_s:.0f} s budget: stopping "
            "after it; for more epochs give a longer --time-limit, or make each cheaper (a smaller "
            "--crop-size or --image-size, fewer --heads, --recipe cpu-fast)"
        )

    def passes_before(self, epoch: int) -> int:
        """Label passes scheduled before optimisation steps of epoch ``epoch`` (0-based)."""
        first = epoch * self.steps_per_epoch
        return sum(first <= s < first + self.steps_per_epoch for s in self.label_steps)

    def records(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) ends with a label step from its recorded outputs."""
        return epoch + 1 in self.label_epochs

    def final_pass(self, epoch: int) -> bool:
        """Whether a global label pass follows epoch ``epoch`` (0-based) as the run's last (online labels)."""
        return self.labels_at_end and epoch + 1 == self.epochs

    def time_left_s(self, done: int) -> float:
        """The rest of the run after ``done`` epochs at the typical epoch time, in seconds."""
        return (self.epochs - done) * typical_epoch_s(self.epoch_times)

    def state_dict(self) -> dict:
        """The checkpoint's ``plan``."""
        return {key: getattr(self, key) for key in _SAVED}

    def load_state_dict(self, plan: dict) -> None:
        """Restore :meth:`state_dict` (and ``last_label_step`` / ``pass_epochs`` where a checkpoint has them)."""
        self.epochs = plan["epochs"]
        self.lr_anchor = tuple(plan["lr_anchor"]) if plan["lr_anchor"] else None
        self.label_steps, self.label_epochs = plan["label_steps"], plan["label_epochs"]
        self.epoch_times = plan["epoch_times"]
        self.last_label_step = plan.get("last_label_step")
        self.pass_epochs = plan.get("pass_epochs", self.pass_epochs)
