"""``sela train --init SOURCE``: the backbone starts from a file's or a library's weights, the heads fresh;
``--epochs 0`` labels the initial backbone alone; downloads are mocked (these machines are offline)."""

import json
import urllib.error

import pytest
import torch
import torchvision

from sela import weights
from sela.build import build_model, resolve, train, user_settings
from sela.cli import main
from sela.data import load_dataset
from sela.models import create_model
from sela.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"labels.updates": 2, "model.heads": 2, "model.clusters": [10], "runtime.progress": False,
        "runtime.device": "cpu", "optim.batch_size": 128}  # fmt: skip
R18 = "torchvision:ResNet18_Weights.IMAGENET1K_V1"


def _backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(("heads.", "projector.", "fc."))}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A one-epoch sela run on digits (a small convnet) and its `sela export` file."""
    root = tmp_path_factory.mktemp("source")
    settings = {**TINY, "optim.epochs": 1, "model.widths": [8, 16], "runtime.out": str(root / "run")}
    train(settings, log=None)
    assert main(["export", str(root / "run"), "-o", str(root / "exp.pt")]) == 0
    return root


def test_a_torchvision_state_dict_file_starts_the_backbone(tmp_path, digits):
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "r18.pt")
    user = user_settings({**TINY, "model.init": str(tmp_path / "r18.pt"), "model.arch": "resnet18"})
    cfg = resolve(user, digits, torch.device("cpu")).config
    model = build_model(cfg, digits, cosine_heads=False)
    got = _backbone(model.state_dict())
    assert got.keys() == _backbone(state).keys() and all(torch.equal(v, state[k]) for k, v in got.items())
    assert model.heads[0].out_features == 10  # fresh heads, not torchvision's 1000-class fc


def test_epochs_0_labels_the_exported_backbone_and_keeps_its_weights(exported, tmp_path):
    export = torch.load(exported / "exp.pt", weights_only=True)
    out = tmp_path / "ep0"
    summary = train({**TINY, "optim.epochs": 0, "model.init": str(exported / "exp.pt"), "runtime.out": str(out)},
                    log=None)  # fmt: skip
    assert summary["epochs"] == 0 and summary["label_updates"] == 1 and "knn_top1" in summary
    assert (out / "labels.csv").is_file() and json.loads((out / "summary.json").read_text()) == summary
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["widths"] == [8, 16] and config["model"]["init"] == str(exported / "exp.pt")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    model = create_model(**ckpt["model_spec"])
    model.load_state_dict(ckpt["model"])
    for name, p in model.named_parameters():  # BatchNorm statistics are re-estimated on the images
        if not name.startswith("heads."):
            assert torch.equal(p, export["state_dict"][name]), name


def test_init_from_a_run_directory_then_resume_without_the_source(exported, tmp_path, monkeypatch):
    source = tmp_path / "source"
    (exported / "run").rename(source) if not source.exists() else None
    settings = {**TINY, "optim.epochs": 2, "model.init": str(source), "runtime.out": str(tmp_path / "run")}
    calls = {"n": 0}
    real = Trainer._next_epoch

    def stop_after_one(self):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self)

    monkeypatch.setattr(Trainer, "_next_epoch", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        train(settings, log=None)
    monkeypatch.setattr(Trainer, "_next_epoch", real)
    source.rename(exported / "run")  # the --init source is gone: resume takes the weights from the checkpoint
    summary = train(settings, resume=True, log=None)
    assert summary["epochs"] == 2


def test_the_recipe_lowers_the_learning_rate_and_labels_from_eval_passes(exported, digits):
    plain = resolve(user_settings({**TINY, "recipe": "cpu-sela"}), digits, torch.device("cpu"))
    start = resolve(user_settings({**TINY, "recipe": "cpu-sela", "model.init": str(exported / "exp.pt")}), digits,
                    torch.device("cpu"))  # fmt: skip
    assert start.config.optim.lr == pytest.approx(0.1 * plain.config.optim.lr)
    assert start.config.labels.inputs == plain.config.labels.inputs == "recorded"  # no extra passes
    assert start.config.model.widths == [8, 16]  # the export's network, not the recipe's
    auto = resolve(
        user_settings({**TINY, "model.init": str(exported / "exp.pt")}), digits, torch.device("cpu")
    )
    assert auto.config.recipe == "digits"  # a dataset's own recipe still wins; its lr is scaled
    assert auto.config.optim.lr == pytest.approx(0.003) and auto.config.labels.inputs == "eval"  # was train


def test_a_torchvision_name_downloads_through_torchvision(monkeypatch):
    state = torchvision.models.resnet18().state_dict()
    seen = {}

    def fake_download(url, *args, **kwargs):
        seen.update(url=url, **kwargs)
        return state

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake_download)
    assert weights.start_network(R18) == {"model.arch": "resnet18"}
    model = create_model("resnet18", [3])
    weights.init_backbone(model, R18)
    assert seen["url"].endswith(".pth") and seen["weights_only"] is True
    assert all(torch.equal(v, state[k]) for k, v in _backbone(model.state_dict()).items())

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(ValueError, match="could not download the weights .*download the weights elsewhere"):
        weights.init_backbone(model, R18)


def test_a_timm_name_downloads_through_timm(monkeypatch):
    timm = pytest.importorskip("timm")
    state = timm.create_model("resnet10t").state_dict()  # as the hub holds it: with the classifier
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", lambda *a, **k: dict(state))
    assert weights.start_network("timm:resnet10t.c3_in1k") == {"model.arch": "timm:resnet10t"}
    model = create_model("timm:resnet10t", [3], input_size=16)
    weights.init_backbone(model, "timm:resnet10t.c3_in1k")
    got = model.state_dict()
    assert all(torch.equal(got[f"body.{k}"], v) for k, v in state.items() if not k.startswith("fc."))

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", offline)
    with pytest.raises(ValueError, match="could not download the weights"):
        weights.init_backbone(model, "timm:resnet10t.c3_in1k")


def _error_line(capsys, argv) -> str:
    assert main(["train", "--no-progress", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sela: error: "), err
    return err[0]


def test_every_failure_is_one_line(capsys, tmp_path, exported, monkeypatch):
    (tmp_path / "bad.pt").write_bytes(b"not a pytorch file")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pt")
    out = ["--out", str(tmp_path / "run")]
    assert "not a readable PyTorch weights file" in _error_line(
        capsys, ["--init", str(tmp_path / "bad.pt"), *out]
    )
    assert "does not exist" in _error_line(capsys, ["--init", str(tmp_path / "none.pt"), *out])
    line = _error_line(capsys, ["--init", str(tmp_path / "r18.pt"), "--arch", "convnet", *out])
    assert "missing" in line and "unexpected" in line and "more" in line and "--arch" in line
    assert "needs --init" in _error_line(capsys, ["--epochs", "0", *out])
    assert "torchvision has no weights" in _error_line(capsys, ["--init", "torchvision:Nope_Weights.X", *out])
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))  # fmt: skip
    assert "could not download" in _error_line(capsys, ["--init", R18, "--epochs", "0", *out])
    assert not (tmp_path / "run").exists()
