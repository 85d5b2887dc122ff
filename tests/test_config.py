"""The schema: sections, defaults equal to the components', TOML files, dotted and legacy overrides, the
resume rule, the docs table."""

import importlib
import inspect
import re
from pathlib import Path

import pytest

from sela.config import (
    BY_KEY,
    LEGACY_KEYS,
    MUST_MATCH,
    OPTIONS,
    TrainConfig,
    apply_overrides,
    compare_configs,
    from_dict,
    markdown_tables,
    read_toml,
    to_dict,
    upgrade,
    validate,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def component_default(path: str):
    """The default that ``"module:Callable.param"`` (or ``"module:CONSTANT"``) names."""
    module, _, name = path.partition(":")
    owner, _, param = name.partition(".")
    target = getattr(importlib.import_module(module), owner)
    if not param:
        return target
    value = inspect.signature(target).parameters[param].default
    return list(value) if isinstance(value, tuple) else value


def test_defaults_round_trip():
    cfg = TrainConfig()
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.feeds], ids=lambda o: o.key)
def test_every_default_is_the_components_own(option):
    assert option.default == component_default(option.feeds), f"{option.key} drifted from {option.feeds}"


def test_every_key_is_declared_once_and_every_flag_once():
    keys = [o.key for o in OPTIONS]
    flags = [o.flag for o in OPTIONS if o.flag]
    assert len(keys) == len(set(keys)) and len(flags) == len(set(flags))
    assert all(o.help for o in OPTIONS)


def test_dotted_overrides_parse_and_type_check():
    cfg = apply_overrides(
        TrainConfig(), ["augment.grayscale_p=0.1", "model.clusters=[10,20]", "model.arch=resnet18"]
    )
    assert (cfg.augment.grayscale_p, cfg.model.clusters, cfg.model.arch) == (0.1, [10, 20], "resnet18")
    assert apply_overrides(TrainConfig(), {"model.clusters": "10,20"}).model.clusters == [10, 20]
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(TrainConfig(), ["optim.epoch=3"])
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(TrainConfig(), ["model=3"])  # a section is not a value
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(TrainConfig(), ["optim.epochs"])
    with pytest.raises(ValueError, match="integer"):
        apply_overrides(TrainConfig(), {"optim.epochs": 2.5})
    with pytest.raises(ValueError, match="true or false"):
        apply_overrides(TrainConfig(), {"runtime.sync_bn": "maybe"})


def test_legacy_flat_keys_still_work_as_overrides():
    cfg = apply_overrides(
        TrainConfig(), ["sela_temperature=0.1", "swap_queue=8", "label_updates=3", "epochs=2"]
    )
    assert (cfg.sela.temperature, cfg.swapped.queue, cfg.labels.updates, cfg.optim.epochs) == (0.1, 8, 3, 2)
    assert LEGACY_KEYS["crop_size"] == "augment.crop_size" and LEGACY_KEYS["eval_size"] == "eval.size"


def test_an_old_flat_config_upgrades_to_the_sections():
    old = {"dataset": "digits", "arch": "convnet", "heads": 2, "clusters": [10], "lam": 25.0,
           "label_inputs": "train", "swap_queue": 0, "eval_size": 12, "augment": {"flip_p": 0.0},
           "_command": ["sela"], "gone_key": 1}  # fmt: skip
    new = upgrade(old)
    assert new["model"] == {"arch": "convnet", "heads": 2, "clusters": [10]}
    assert new["labels"] == {"lam": 25.0, "inputs": "train"} and new["eval"] == {"size": 12}
    assert new["augment"] == {"flip_p": 0.0} and new["_command"] == ["sela"] and "gone_key" not in new
    assert upgrade(new) is new


def test_the_resume_rule_covers_the_cosine_heads_and_reads_old_runs():
    assert (
        "sela.temperature" in MUST_MATCH
        and "model.arch" in MUST_MATCH
        and "runtime.workers" not in MUST_MATCH
    )
    saved = to_dict(TrainConfig())
    changed = apply_overrides(TrainConfig(), {"sela.temperature": 0.1, "runtime.workers": 0})
    assert compare_configs(saved, to_dict(changed)) == ["sela.temperature: None -> 0.1"]
    old_flat = {"arch": "convnet", "epochs": 60, "sela_temperature": None}
    assert compare_configs(old_flat, to_dict(apply_overrides(TrainConfig(), {"optim.epochs": 3}))) == [
        "optim.epochs: 60 -> 3"
    ]


def test_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('epochs = 7\n[model]\narch = "resnet18"\n[augment]\nblur_p = 0.5\n')
    cfg = apply_overrides(TrainConfig(), read_toml(path))
    assert cfg.model.arch == "resnet18" and cfg.optim.epochs == 7 and cfg.augment.blur_p == 0.5
    path.write_text("epochs = [\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        read_toml(path)
    with pytest.raises(ValueError, match="does not exist"):
        read_toml(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"optim.epochs": -1}, "--epochs must be >= 0"),
        ({"optim.lr": float("nan")}, "--lr must be a positive number"),
        ({"model.clusters": [10, 1]}, "--clusters must be >= 2"),
        ({"labels.inputs": "test"}, "--label-inputs must be one of eval, train, recorded"),
        ({"augment.small_crop_size": 0}, "augment.small_crop_size must be >= 1"),
        ({"optim.time_limit": 0}, "--time-limit must be a positive number"),
    ],
)
def test_declared_checks_name_the_flag(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(apply_overrides(TrainConfig(), override))
    validate(TrainConfig())


def test_the_docs_hold_the_generated_options_tables():
    """docs/training.md's options tables are `python -m sela.config`'s output: a field missing from the
    docs, or a stale default, fails here (regenerate: python -m sela.config docs/training.md)."""
    from sela.config import DOCS_BEGIN as begin
    from sela.config import DOCS_END as end

    text = DOCS.read_text()
    assert begin in text and end in text
    assert text.split(begin)[1].split(end)[0] == markdown_tables()
    for o in OPTIONS:
        assert f"`{o.key}`" in text


def test_a_new_option_is_one_declaration():
    """Adding a field to a section makes it a key, a flag, a docs row and (if asked) a resume rule."""
    from dataclasses import make_dataclass

    from sela import config

    section = make_dataclass(
        "Extra", [("knob", int, config.option(3, "a throw-away knob", flag="--knob", resume=True))]
    )
    options = config._options(section, "extra.")
    assert [(o.key, o.flag, o.default, o.resume) for o in options] == [("extra.knob", "--knob", 3, True)]
    assert BY_KEY["model.heads"].flag == "--heads"
