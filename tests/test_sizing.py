"""Budget-aware sizing: the candidate sides, the choice from measured epoch costs, the measurement, and a
run that trains, records and resumes at the side its budget chose."""

import json
import math

import pytest
import torch

from sela import recipes, sizing
from sela.build import fit_to_side, resolve, train, user_settings
from sela.data import ImageSet

CPU = torch.device("cpu")


def _photos(n: int = 64, side: int = 64, seed: int = 0) -> ImageSet:
    """Random colour images (not greyscale, so the colour recipe applies), with two classes."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)
    return ImageSet(images, targets=torch.arange(n) % 2, classes=["a", "b"], name="folder")


def test_candidate_sides_step_down_by_a_quarter_to_32_px_never_up():
    assert recipes.candidate_sides(64) == [64, 48, 32]
    assert recipes.candidate_sides(224) == [224, 168, 128, 96, 72, 56, 40, 32]
    assert recipes.candidate_sides(32) == [32] and recipes.candidate_sides(28) == [28]
    assert recipes.candidate_sides(40) == [40, 32]


def test_the_largest_side_that_affords_the_epochs_is_chosen():
    costs = {64: 30.0, 48: 17.0, 32: 8.0}  # seconds per epoch
    side, why = recipes.side_for_budget(costs, 600.0, epochs=60)  # 20, 35, 75 epochs in 10 min
    assert side == 48 and "about 35 epochs in 10 min" in why and "64 px 20" in why
    assert recipes.side_for_budget(costs, 30 * 30.0, epochs=60)[0] == 64  # exactly MIN_EPOCHS at 64 px
    side, why = recipes.side_for_budget(costs, 60.0, epochs=60)  # none affords 30: the smallest
    assert side == 32 and "about 8 epochs" in why
    side, why = recipes.side_for_budget(costs, None, epochs=60)  # no budget: the images' side, and how long
    assert side == 64 and why == "64 px, about 30 min for 60 epochs"
    with pytest.raises(ValueError, match="at least one side"):
        recipes.side_for_budget({}, 600.0, epochs=60)


def _facts(side: int = 64, n: int = 64) -> recipes.DataFacts:
    return recipes.DataFacts(side=side, channels=3, grey=False, n=n, device="cpu")


def test_choose_side_measures_only_until_a_side_fits(monkeypatch):
    monkeypatch.setattr(sizing.dist, "all_reduce_max", lambda value, device: value)
    measured = []

    def cost(cfg, train_set, device):  # an epoch costs side^2 / 100 s: 64 px 41 s, 48 px 23 s, 32 px 10 s
        measured.append((cfg.data.image_size, cfg.augment.crop_size))
        return cfg.data.image_size**2 / 100

    user = {"optim.time_limit": 12.0}
    side, why = sizing.choose_side("cpu-fast", _facts(), user, {}, _photos(), CPU, cost=cost)
    assert side == 48 and measured == [(64, 32), (48, 24)]  # views half the side; 32 px never measured
    measured.clear()
    side, why = sizing.choose_side("cpu-fast", _facts(), {}, {}, _photos(), CPU, cost=cost)
    assert side == 64 and measured == [(64, 32)] and "for 60 epochs" in why  # no budget: one measurement


def test_the_measured_epoch_cost_is_real_time_of_real_steps():
    from sela.config import TrainConfig, apply_overrides

    images = _photos(n=40, side=32)
    chosen = recipes.settings("cpu-fast", _facts(side=32, n=40))
    cfg = apply_overrides(TrainConfig(), {**chosen, "data.image_size": 32, "model.widths": [8, 8, 8]})
    seconds = sizing.epoch_seconds(cfg, images, CPU)
    assert math.isfinite(seconds) and 0 < seconds < 60  # 40 images, three steps of a tiny network
    part = sizing.sample(images, 16, 8)
    assert part.images.shape == (8, 3, 16, 16) and part.mean == images.mean


def test_resolve_sizes_a_fast_recipe_only_when_nothing_fixes_the_side():
    calls = []

    def cost(cfg, train_set, device):
        calls.append(cfg.data.image_size)
        return cfg.data.image_size**2 / 100

    images, budget = _photos(), {"data.dataset": "folder", "optim.time_limit": 12.0}
    resolved = resolve(user_settings(budget), images, CPU, cost=cost)
    cfg = resolved.config
    assert (cfg.data.image_size, cfg.augment.crop_size) == (48, 24) and calls == [64, 48]
    assert "48 px: about 31 epochs in 12 min" in resolved.recipe_line()
    assert "data.image_size=48" in resolved.recipe_line()
    calls.clear()
    fixed = resolve(user_settings({**budget, "data.image_size": 64}), images, CPU, cost=cost).config
    assert fixed.data.image_size == 64 and fixed.augment.crop_size == 32 and calls == []  # the user's side
    resumed = resolve(user_settings(budget), images, CPU, start={"data.image_size": 64}, cost=cost).config
    assert resumed.data.image_size == 64 and calls == []  # a resumed run keeps the side it started with
    paper = resolve(user_settings({**budget, "recipe": "paper"}), images, CPU, cost=cost).config
    assert paper.data.image_size == 224 and calls == []  # the paper's protocol fixes its own side


def test_fit_to_side_resizes_in_memory_sets_as_the_reader_would():
    from sela.config import TrainConfig, apply_overrides
    from sela.data.datasets import resize_images

    images = _photos(n=6, side=64)
    cfg = apply_overrides(TrainConfig(), {"data.image_size": 32})
    fitted = fit_to_side(cfg, images)
    assert fitted.images.shape == (6, 3, 32, 32) and torch.equal(fitted.images, resize_images(images.images, 32))
    assert torch.equal(fitted.targets, images.targets) and fitted.mean == images.mean
    assert fit_to_side(apply_overrides(TrainConfig(), {}), images) is images  # no side chosen: unchanged


@pytest.mark.filterwarnings("ignore")  # a tiny run on noise: the verdict may well warn
def test_a_budgeted_run_trains_records_and_resumes_at_the_side_it_chose(tmp_path, monkeypatch, capsys):
    """A 48 px folder and a budget that affords MIN_EPOCHS only at 32 px: the run trains at 32 px, says why,
    records 32 in config.json (so that export and eval read at 32 px), and its resume keeps 32 px even
    when the measured costs would now choose otherwise."""
    from PIL import Image

    for split, n in (("train", 24), ("test", 8)):
        for i in range(n):
            folder = tmp_path / "data" / split / "ab"[i % 2]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = torch.randint(0, 256, (48, 48, 3), generator=torch.Generator().manual_seed(i)).byte().numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")
    monkeypatch.setattr(sizing, "epoch_seconds", lambda cfg, s, d: cfg.data.image_size**2 / 1000)  # 48: 2.3 s
    settings = {"data.dataset": "folder", "data.data_dir": str(tmp_path / "data"), "optim.time_limit": 0.05,
                "optim.epochs": 1, "model.heads": 1, "model.widths": [8, 8, 8], "runtime.device": "cpu",
                "runtime.out": str(tmp_path / "run"), "runtime.progress": False}  # fmt: skip
    lines = []
    train(settings, log=lines.append)
    recipe = next(line for line in lines if line.startswith("recipe "))
    assert "32 px: about 3 epochs in 3 s" in recipe and "48 px 1" in recipe
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["image_size"] == 32 and config["_data"]["side"] == 32
    assert config["augment"]["crop_size"] == 16
    monkeypatch.setattr(sizing, "epoch_seconds", lambda cfg, s, d: 0.001)  # now 48 px would fit
    lines.clear()
    train(settings, resume=True, log=lines.append)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["image_size"] == 32
