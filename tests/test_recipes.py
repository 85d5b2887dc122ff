"""Recipes: the rule that picks one from the images and the device, and what each sets."""

import json
import math

import pytest
import torch
from PIL import Image

from sela.cli import main
from sela.config import BY_KEY
from sela.data import ImageSet
from sela.recipes import MIXED_GRAYSCALE_P, RECIPES, DataFacts, choose, data_facts, settings
from sela.runs import load_run


def two_class_folder(root, n_train: int, n_test: int, image) -> str:
    """An ImageFolder tree root/{train,test}/{0,1}/i.png of ``image(c, i)`` (a PIL image); returns root."""
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(2):
            (root / split / str(c)).mkdir(parents=True)
            for i in range(n // 2):
                image(c, i).save(root / split / str(c) / f"{i}.png")
    return str(root)


def colour_image(c: int, i: int) -> Image.Image:
    return Image.new("RGB", (12, 12), (255 * c, 40 * (i % 5), 90))


def grey_image(c: int, i: int) -> Image.Image:
    image = Image.new("L", (16, 16), 30 * (i % 5))
    image.paste(255, (4 * c, 2, 4 * c + 8, 14))
    return image


def test_the_rule_follows_the_device():
    cpu = DataFacts(side=32, channels=3, grey=False, n=50_000, device="cpu")
    assert choose(cpu)[0] == "cpu-fast" and "CPU, 50000 3-channel images of 32 px" in choose(cpu)[1]
    assert choose(DataFacts(32, 3, False, 50_000, "cuda"))[0] == "gpu-fast"


@pytest.mark.parametrize(("side", "view", "pools"), [(32, 16, [True, True, False]), (28, 14, [True, True, False]),
                                                     (64, 32, [True, True, True]), (16, 8, [True, False, False])])  # fmt: skip
def test_views_are_half_the_side_and_pool_to_a_small_map(side, view, pools):
    s = settings("cpu-fast", DataFacts(side, 3, False, 50_000, "cpu"))
    assert s["augment.crop_size"] == view and s["model.pools"] == pools and s["objective"] == "swapped"


def test_greyscale_images_get_no_colour_augmentation_and_few_images_fewer_clusters():
    grey = settings("cpu-fast", DataFacts(28, 3, True, 1_000, "cpu"))
    assert grey["augment.jitter"][2:] == [0.0, 0.0] and grey["augment.grayscale_p"] == 0.0
    assert "augment.flip_p" not in grey and "augment.crop_scale" not in grey  # a colour image's flips and crops
    assert grey["model.clusters"] == [50]  # N / 20
    colour = settings("cpu-fast", DataFacts(32, 3, False, 50_000, "cpu"))
    assert colour["augment.jitter"] == [0.4, 0.4, 0.4, 0.1] and colour["model.clusters"] == [128]
    with pytest.raises(ValueError, match="unknown recipe"):
        settings("fastest", DataFacts(32, 3, False, 50_000, "cpu"))
    assert set(RECIPES) == {
        "digits",
        "cpu-fast",
        "cpu-sela",
        "gpu-fast",
        "gpu-sela",
        "paper",
        "paper-resnet18",
    }
    gpu = settings("gpu-sela", DataFacts(32, 3, False, 50_000, "cuda"))
    assert (gpu["model.arch"], gpu["objective"], gpu["labels.inputs"]) == (
        "resnet18_cifar",
        "sela",
        "recorded",
    )


def test_the_paper_recipe_is_the_published_cifar_setting():
    """yukimasano/self-label, scripts/cifar.sh and cifar.py: AlexNet at 224 px, 10 x 128, lambda 10, 400
    epochs and label steps, lr 0.03, batch 128, one head per label step from augmented train-mode outputs."""
    paper = settings("paper", DataFacts(32, 3, False, 50_000, "cuda"))
    published = {"model.arch": "alexnet", "data.image_size": 224, "model.heads": 10, "model.clusters": [128],
                 "labels.lam": 10.0, "optim.epochs": 400, "labels.updates": 400, "labels.spacing": "linear",
                 "labels.heads": "round-robin", "labels.inputs": "train", "optim.lr": 0.03,
                 "optim.batch_size": 128, "optim.lr_schedule": "step", "optim.warmup_epochs": 0.0,
                 "augment.jitter": [0.4, 0.4, 0.4, 0.4], "augment.grayscale_p": 0.2}  # fmt: skip
    assert {k: paper[k] for k in published} == published
    resnet = settings("paper-resnet18", DataFacts(32, 3, False, 50_000, "cuda"))
    differ = ("model.arch", "data.image_size")
    assert (resnet["model.arch"], resnet["data.image_size"]) == ("resnet18_cifar", None)
    assert {k: v for k, v in resnet.items() if k not in differ} == {
        k: v for k, v in paper.items() if k not in differ
    }


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("recipe", ["paper", "paper-resnet18"])
def test_the_paper_recipes_run_on_the_cpu(tmp_path, recipe):
    """A smoke run: one short epoch of each paper recipe on 12 px images (AlexNet sees them at 224 px)."""
    data = two_class_folder(tmp_path / "data", 32, 8, colour_image)
    out = tmp_path / "run"
    args = ["train", "--dataset", "folder", "--data-dir", data, "--out", str(out), "--recipe", recipe]
    assert main([*args, "--epochs", "1", "--batch-size", "16", "--clusters", "4", "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == recipe and config["eval"]["size"] == (224 if recipe == "paper" else 12)
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["knn_top1"]) and summary["label_updates"] >= 1
    sela = settings("cpu-sela", DataFacts(32, 3, False, 50_000, "cpu"))
    assert (sela["objective"], sela["labels.inputs"], sela["augment.small_crops"], sela["labels.lam"]) == (
        "sela",
        "recorded",
        0,
        10.0,
    )
    # harder crops for the offline objective, on greyscale images too; the swapped recipe keeps the default
    assert sela["augment.crop_scale"] == [0.08, 1.0]
    assert "augment.crop_scale" not in settings("cpu-fast", DataFacts(32, 3, False, 50_000, "cpu"))
    assert settings("cpu-sela", DataFacts(28, 1, True, 50_000, "cpu"))["augment.crop_scale"] == [0.08, 1.0]


def test_greyscale_is_detected_from_equal_channels():
    rgb = torch.randint(0, 255, (20, 3, 8, 8), dtype=torch.uint8)
    grey = rgb[:, :1].repeat(1, 3, 1, 1)
    cpu = torch.device("cpu")
    assert not data_facts(ImageSet(rgb), 8, cpu).grey and data_facts(ImageSet(grey), 8, cpu).grey
    assert data_facts(ImageSet(rgb[:, :1]), 8, cpu).grey


def test_a_folder_mixing_colour_and_greyscale_gets_more_grey_views():
    """30 % of the images grey: the share is measured on the sample, said in the recipe line, and the
    colour recipes turn more views grey so that colourfulness stops separating the images."""
    rgb = torch.randint(0, 256, (100, 3, 8, 8), dtype=torch.uint8)
    rgb[:30] = rgb[:30, :1]  # 30 grey images (R = G = B)
    facts = data_facts(ImageSet(rgb), 8, torch.device("cpu"))
    assert not facts.grey and facts.grey_share == pytest.approx(0.3) and facts.mixed
    assert "(30% greyscale)" in facts.describe()
    mixed = settings("cpu-fast", facts)
    assert mixed["augment.grayscale_p"] == MIXED_GRAYSCALE_P > BY_KEY["augment.grayscale_p"].default
    plain = settings("cpu-fast", DataFacts(8, 3, False, 100, "cpu", grey_share=0.01))
    assert "augment.grayscale_p" not in plain


@pytest.mark.filterwarnings("ignore")
def test_sela_train_says_and_records_the_recipe_and_flags_override_it(tmp_path, capsys):
    data = two_class_folder(tmp_path / "data", 40, 10, colour_image)
    out = tmp_path / "run"
    args = ["train", "--dataset", "folder", "--data-dir", data, "--out", str(out)]
    assert main([*args, "--epochs", "1", "--batch-size", "8", "--heads", "1", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "recipe cpu-fast (CPU, 40 3-channel images of 12 px" in said
    assert "model.heads=1 (recipe: 5)" in said and "optim.batch_size=8 (recipe: 16)" in said  # 40 images
    assert "optim.lr=0.25," in said
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == "cpu-fast" and config["objective"] == "swapped"
    assert config["augment"]["crop_size"] == 8
    assert config["optim"]["batch_size"] == 8 and config["model"]["heads"] == 1  # flags win over the recipe
    assert config["eval"]["size"] == 12  # 8 px views of crops down to 0.2: 17.9 px, capped at the side


@pytest.mark.filterwarnings("ignore")
def test_greyscale_runs_are_evaluated_at_the_scale_their_views_showed(tmp_path):
    """cpu-fast on 16 px greyscale images with crops of 0.5-1: 8 px views, so the label step, the final
    evaluation and a reopened run see whole images at 8 / sqrt(0.5) = 11 px."""
    data = two_class_folder(tmp_path / "data", 40, 10, grey_image)
    out = tmp_path / "run"
    args = ["train", "--dataset", "folder", "--data-dir", data, "--out", str(out), "--set", "augment.crop_scale=[0.5,1.0]"]
    assert main([*args, "--epochs", "1", "--batch-size", "16", "--heads", "1", "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    augment = config["augment"]
    assert (augment["crop_size"], augment["crop_scale"], config["eval"]["size"]) == (8, [0.5, 1.0], 11)
    run = load_run(out)
    assert run.image_size == 11 and run.transform.out_size == 11 and run.train_set.side() == 16
    assert load_run(out, image_size=16).transform.out_size == 16  # asked for: that size
    resume = [*args, "--epochs", "1", "--batch-size", "16", "--heads", "1", "--no-progress", "--resume"]
    assert main(resume) == 0  # the recorded size is resolved again before the resume check
    assert main([*resume, "--eval-size", "12"]) == 2  # another size is a different run
    assert main([*args, "--epochs", "1", "--batch-size", "16", "--heads", "1", "--no-progress",
                 "--eval-size", "16", "--out", str(tmp_path / "run16")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "run16" / "config.json").read_text())["eval"]["size"] == 16


@pytest.mark.filterwarnings("ignore")
def test_sela_objective_options_are_recorded_in_config_json(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--epochs", "1", "--no-progress", "--small-crops", "1"]
    sela = ["--set", "sela.temperature=0.2", "--set", "soft_targets=2"]  # a legacy flat key still works
    assert main([*args, *sela, "--label-inputs", "recorded"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["objective"], config["augment"]["small_crops"]) == ("sela", 1)
    assert config["sela"] == {"temperature": 0.2, "soft_targets": 2, "prototypes": "learned"}
