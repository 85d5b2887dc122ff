"""Budget-aware sizing: the training side that gives a time budget the passes over the data it needs.

A fast recipe trains on views half the training side, and its label steps and evaluation see whole images
at the views' scale, so every pixel of the side costs in every pass. With ``--time-limit``, the budget
buys ``budget / epoch time`` epochs; on 64 px photographs a CPU run of the default command got 5 to 18
epochs and fell 7 to 10 points below the same images at 32 px, where it got 28 to 67
(docs/experiments.md, "Budget-aware sizing"). :func:`choose_side` therefore measures what one epoch costs
at each candidate side (:func:`sela.recipes.candidate_sides`: the images' own side, then steps of 3/4
down to 32 px, never up) and keeps the largest side that still affords
:data:`sela.recipes.MIN_EPOCHS` epochs (:func:`sela.recipes.side_for_budget`). A run without a time
limit keeps the images' side and is told how long its epochs will take.

The measurement (:func:`epoch_seconds`) is real: the recipe's network and objective at that side, a few
training steps of the run's batch (views made on the device, forward at the run's precision, backward,
SGD) on a sample of the training images, timed after a warm-up step, scaled to N images. It takes one to
three seconds per candidate on a CPU; it uses the threads torch is set to (as the run will). Distributed
runs take the slowest rank's figures (one all-reduce per candidate), so that every rank chooses the
same side.

Only in-memory sets of a fast recipe (``cpu-fast``, ``cpu-sela``, ``gpu-fast``, ``gpu-sela``) chosen by
``auto`` or asked for are sized, and only when neither the user (``--image-size``) nor the recipe nor a
resumed run fixes the side.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from sela import distributed as dist
from sela import recipes
from sela.config import TrainConfig, apply_overrides
from sela.data import ImageSet
from sela.data.datasets import resize_images

SIZED_RECIPES = ("cpu-fast", "cpu-sela", "gpu-fast", "gpu-sela")
TIMED_STEPS = 2  # after one warm-up step

# seconds for one epoch of this configuration on these images
EpochCost = Callable[[TrainConfig, ImageSet, torch.device], float]


def applies(name: str, user: dict[str, Any], start: dict[str, Any], train_set: ImageSet) -> bool:
    """Whether a run's side is chosen here: a fast recipe, images in memory, no side fixed elsewhere."""
    fixed = "data.image_size" in user or "data.image_size" in start
    return name in SIZED_RECIPES and train_set.in_memory and not fixed


def sample(train_set: ImageSet, side: int, n: int) -> ImageSet:
    """``n`` images taken at an even stride over the set, resized to ``side`` px (statistics kept)."""
    step = max(1, len(train_set) // n)
    images = resize_images(train_set.images[::step][:n], side)  # (n, C, side, side)
    return ImageSet(images, name=train_set.name, mean=train_set.mean, std=train_set.std)


def epoch_seconds(cfg: TrainConfig, train_set: ImageSet, device: torch.device) -> float:
    """Seconds one epoch of ``cfg``'s training steps takes on ``train_set`` (N images at
    ``cfg.data.image_size`` px): :data:`TIMED_STEPS` real steps after a warm-up one, per image, times N,
    times :data:`sela.recipes.EPOCH_OVERHEAD` (the label passes' share)."""
    from sela.build import build_model, build_objective
    from sela.labeller import LabelState
    from sela.train import autocast_dtype

    batch = min(cfg.optim.batch_size, len(train_set))  # the run's batch: per image, 64 px costs more at 256 than at 64
    part = sample(train_set, cfg.data.image_size, batch)
    objective = build_objective(cfg, part, device)
    model = build_model(cfg, part, cosine_heads=objective.cosine_heads, init=False)
    objective.prepare(model)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    state = LabelState(len(model.n_clusters), batch, soft=objective.soft_targets)
    images, idx = part.images.to(device), torch.arange(batch, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    amp = autocast_dtype(cfg.runtime.precision, device)  # the run's precision (bf16 where native)
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    def step() -> None:
        loss, _ = objective.loss(model, images, idx, state, generator=generator, autocast=autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        float(loss.detach())  # wait for the device

    step()
    start = time.perf_counter()
    for _ in range(TIMED_STEPS):
        step()
    per_image = (time.perf_counter() - start) / (TIMED_STEPS * batch)
    return per_image * len(train_set) * recipes.EPOCH_OVERHEAD


def choose_side(
    name: str,
    facts: recipes.DataFacts,
    user: dict[str, Any],
    start: dict[str, Any],
    train_set: ImageSet,
    device: torch.device,
    *,
    cost: EpochCost = epoch_seconds,
) -> tuple[int, str]:
    """The training side (px) for recipe ``name`` on these images and the reason (a phrase for the recipe
    line). ``user``: the user's settings (their ``optim.time_limit``, minutes, is the budget); ``cost``:
    seconds per epoch of a configuration (default: measured, :func:`epoch_seconds`)."""
    budget_min = apply_overrides(TrainConfig(), user).optim.time_limit
    sides = recipes.candidate_sides(facts.side) if budget_min is not None else [facts.side]
    costs = {}
    for side in sides:
        chosen = recipes.settings(name, replace(facts, side=side))
        cfg = apply_overrides(apply_overrides(TrainConfig(), {**chosen, **start}), {**user, "data.image_size": side})
        costs[side] = dist.all_reduce_max(cost(cfg, train_set, device), device)
        if budget_min is not None and costs[side] * recipes.MIN_EPOCHS <= budget_min * 60:
            break  # the largest side that affords the epochs: smaller ones need not be measured
    epochs = apply_overrides(TrainConfig(), {**recipes.settings(name, facts), **user}).optim.epochs
    return recipes.side_for_budget(costs, None if budget_min is None else budget_min * 60, epochs=epochs)
