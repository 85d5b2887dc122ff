"""Configuration: defaults, dataset presets, TOML files and dotted overrides."""

import pytest

from sela.config import TrainConfig, apply_overrides, from_dict, load_toml, to_dict, train_defaults


def test_defaults_round_trip():
    cfg = TrainConfig()
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


def test_digits_preset_and_plain_defaults():
    digits = train_defaults("digits")
    assert digits.clusters == [10] and digits.augment.flip_p == 0.0 and digits.image_size == 16
    assert digits.label_inputs == "train"
    cifar = train_defaults("cifar10")
    assert (
        cifar.dataset == "cifar10"
        and cifar.augment.flip_p == 0.5
        and cifar.clusters == TrainConfig().clusters
    )


def test_dotted_overrides_parse_and_type_check():
    cfg = apply_overrides(
        TrainConfig(), ["augment.grayscale_p=0.1", "clusters=[10,20]", "arch=resnet18", "epochs=3"]
    )
    assert (
        cfg.augment.grayscale_p == 0.1
        and cfg.clusters == [10, 20]
        and cfg.arch == "resnet18"
        and cfg.epochs == 3
    )
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(TrainConfig(), ["epoch=3"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(TrainConfig(), ["epochs"])
    with pytest.raises(ValueError, match="integer"):
        apply_overrides(TrainConfig(), {"epochs": 2.5})
    with pytest.raises(ValueError, match="true or false"):
        apply_overrides(TrainConfig(), {"sync_bn": "maybe"})


def test_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('arch = "resnet18"\nepochs = 7\n[augment]\nblur_p = 0.5\n')
    cfg = load_toml(TrainConfig, path)
    assert cfg.arch == "resnet18" and cfg.epochs == 7 and cfg.augment.blur_p == 0.5
    path.write_text("epochs = [\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_toml(TrainConfig, path)
    with pytest.raises(ValueError, match="does not exist"):
        load_toml(TrainConfig, tmp_path / "missing.toml")
