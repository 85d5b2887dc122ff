"""Tests for sela.runs: opening sela runs, sela checkpoints and foreign checkpoints for inspection."""

import json

import numpy as np
import pytest
import torch
import torchvision

from sela.models import create_model
from sela.runs import load_run

N_TRAIN = 1437  # digits training split


pytestmark = pytest.mark.usefixtures("one_thread")


def _convnet(ks=(10, 6), **kwargs):
    torch.manual_seed(0)
    return create_model("convnet", list(ks), widths=(8, 16), input_size=16, **kwargs)


def _fake_run(tmp_path, *, labels=None, summary=None):
    """A run directory as `sela train` leaves it, without training (random weights)."""
    model = _convnet()
    labels = torch.randint(0, 6, (2, N_TRAIN)) if labels is None else labels
    config = {"dataset": "digits", "data_dir": None, "image_size": None, "arch": "convnet", "widths": [8, 16]}
    ckpt = {
        "format": 2,
        "model_spec": model.spec,
        "model": model.state_dict(),
        "labels": labels,
        "config": config,
    }
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    (tmp_path / "config.json").write_text(json.dumps(config))
    if summary is not None:
        (tmp_path / "summary.json").write_text(json.dumps(summary))
    return model, labels


def test_run_directory_and_checkpoint_file(tmp_path):
    model, labels = _fake_run(tmp_path, summary={"best_head": 1})
    for source in (tmp_path, tmp_path / "checkpoint.pt"):
        run = load_run(source)
        assert run.run_dir == tmp_path and run.summary == {"best_head": 1}
        assert (run.arch, run.dataset, run.image_size) == ("convnet", "digits", 16)
        assert run.model.n_clusters == [10, 6] and run.untrained_heads == []
        assert torch.equal(run.labels, labels)
        assert len(run.train_set) == N_TRAIN and len(run.test_set) == 360
        assert run.train_set.images.shape[-1] == 16
        for key, value in model.state_dict().items():
            assert torch.equal(run.model.state_dict()[key], value)


def test_the_model_spec_rebuilds_the_network(tmp_path):
    model = _convnet(projector=(24, 12))
    config = {"dataset": "digits", "arch": "convnet"}
    torch.save(
        {"format": 2, "model_spec": model.spec, "model": model.state_dict(), "config": config},
        tmp_path / "c.pt",
    )
    run = load_run(tmp_path / "c.pt", test_split=False)
    assert run.model.head_dim == 12 and run.untrained_heads == []
    for key, value in model.state_dict().items():
        assert torch.equal(run.model.state_dict()[key], value), key


# a run of sela before checkpoints recorded the model's spec (format 1): its config says how it was built
LEGACY = {"dataset": "digits", "arch": "convnet", "heads": 2, "clusters": [10, 6], "widths": [8, 16]}


def test_unpooled_blocks_are_read_from_a_legacy_config(tmp_path):
    model = _convnet(pools=(True, False)).eval()  # the weights alone look like a pooled convnet
    config = {**LEGACY, "pools": [True, False]}
    torch.save({"model": model.state_dict(), "config": config}, tmp_path / "c.pt")
    run = load_run(tmp_path / "c.pt", test_split=False)
    assert run.model.pools == (True, False)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(run.model.forward_features(x), model.forward_features(x))


@pytest.mark.parametrize("objective", ["sela", "swapped"])
def test_swapped_runs_get_their_cosine_heads_back(tmp_path, objective):
    model = _convnet()
    config = {**LEGACY, "objective": objective}
    torch.save({"model": model.state_dict(), "config": config}, tmp_path / "c.pt")
    run = load_run(tmp_path / "c.pt", test_split=False)
    assert run.model.normalize_heads == (objective == "swapped")


def test_flags_override_the_run(tmp_path):
    _fake_run(tmp_path)
    run = load_run(tmp_path, image_size=12, test_split=False)
    assert run.image_size == 12 and run.train_set.images.shape[-1] == 12 and run.test_set is None
    with pytest.raises(ValueError, match="drop --arch"):
        load_run(tmp_path, arch="resnet18")


def test_missing_sources_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(ValueError, match="holds no checkpoint.pt"):
        load_run(tmp_path)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_run(tmp_path / "junk.pt", arch="convnet", dataset="digits")


def test_foreign_state_dict_needs_arch_and_dataset(tmp_path):
    torch.save(_convnet().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="--arch NAME --dataset NAME"):
        load_run(tmp_path / "w.pt")
    with pytest.raises(ValueError, match="unknown architecture"):
        load_run(tmp_path / "w.pt", arch="vgg", dataset="digits")
    run = load_run(tmp_path / "w.pt", arch="convnet", dataset="digits")
    assert run.model.n_clusters == [10, 6] and run.labels is None and run.config == {}


def test_released_sela_checkpoint_with_numpy_labels(tmp_path):
    model = _convnet()
    state = {"module." + k.replace("heads.", "top_layer"): v for k, v in model.state_dict().items()}
    labels = np.random.default_rng(0).integers(0, 6, (2, N_TRAIN))
    torch.save({"state_dict": state, "labels": labels}, tmp_path / "release.pth")
    run = load_run(tmp_path / "release.pth", arch="convnet", dataset="digits")
    assert run.model.n_clusters == [10, 6] and run.untrained_heads == []
    assert torch.equal(run.labels, torch.from_numpy(labels))
    assert torch.equal(run.model.heads[1].weight, model.heads[1].weight)


def test_labels_for_another_dataset_are_dropped_with_a_note(tmp_path):
    _fake_run(tmp_path, labels=torch.zeros(2, 50, dtype=torch.long))
    run = load_run(tmp_path, test_split=False)
    assert run.labels is None and "do not match" in run.notes[0]


def test_torchvision_resnet_weights(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv.pth")
    run = load_run(tmp_path / "tv.pth", arch="resnet18", dataset="digits", image_size=16, test_split=False)
    assert run.model.n_clusters == [1000]  # torchvision's fc becomes a head
    with pytest.raises(ValueError, match="drop --clusters"):
        load_run(tmp_path / "tv.pth", arch="resnet18", dataset="digits", clusters=[10], test_split=False)


def test_checkpoint_without_heads_gets_placeholder_heads(tmp_path):
    state = {k: v for k, v in _convnet().state_dict().items() if not k.startswith("heads.")}
    torch.save(state, tmp_path / "backbone.pt")
    run = load_run(tmp_path / "backbone.pt", arch="convnet", dataset="digits", clusters=[5, 7], image_size=16)
    assert run.model.n_clusters == [5, 7] and run.untrained_heads == [0, 1] and run.trained_heads == []
    assert "not in the checkpoint" in run.notes[0]


def test_images_that_do_not_fit_the_model(tmp_path):
    torch.save(_convnet(in_channels=1).state_dict(), tmp_path / "grey.pt")
    with pytest.raises(ValueError, match="images have 3 channels but convnet takes 1"):
        load_run(tmp_path / "grey.pt", arch="convnet", dataset="digits", image_size=16)
    alex = create_model("alexnet", [4], input_size=32, size=(4, 4, 4, 4, 4), hidden_dim=8)
    torch.save(alex.state_dict(), tmp_path / "alex.pt")
    assert load_run(tmp_path / "alex.pt", arch="alexnet", dataset="digits", image_size=16).model
    with pytest.raises(ValueError, match=r"do not fit alexnet .*pass --image-size"):
        load_run(tmp_path / "alex.pt", arch="alexnet", dataset="digits", image_size=4)
