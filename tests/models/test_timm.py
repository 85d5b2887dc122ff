"""timm backbones (``--arch timm:<name>``): a few small timm models, randomly initialised, at small inputs,
checked as tests/models/test_models.py checks sela's own."""

import sys

import pytest
import torch
import torch.nn.functional as F

from sela.models import create_model
from sela.models.export import backbone_payload, backbone_spec, load_exported, timm_recipe
from sela.models.pretrained import load_backbone
from sela.models.timm_backbone import timm_network

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")

# (arch, input side): a ResNet (classifier fc), a MobileNetV3 (conv_head kept, classifier), a ViT (fixed size)
TIMM_MODELS = [("timm:resnet10t", 16), ("timm:mobilenetv3_small_050", 32), ("timm:vit_tiny_patch16_224", 32)]


@pytest.mark.parametrize(("arch", "side"), TIMM_MODELS)
def test_forward_backward_and_spec(arch, side):
    torch.manual_seed(0)
    model = create_model(arch, [7, 5], input_size=side)
    x = torch.randn(2, 3, side, side)
    assert model.forward_features(x).shape == (2, model.feature_dim)
    logits = model(x)
    assert [tuple(t.shape) for t in logits] == [(2, 7), (2, 5)]
    sum(F.cross_entropy(t, torch.tensor([0, 1])) for t in logits).backward()
    assert all(h.weight.grad is not None for h in model.heads)
    rebuilt = create_model(**model.spec)
    assert rebuilt.spec == model.spec and rebuilt.state_dict().keys() == model.state_dict().keys()
    smaller = torch.randn(2, 3, side // 2, side // 2)  # training views smaller than the images
    assert model.forward_features(smaller).shape == (2, model.feature_dim)


@pytest.mark.parametrize(("arch", "side"), TIMM_MODELS)
def test_export_loads_strictly_into_timm(arch, side, tmp_path):
    model = create_model(arch, [3], input_size=side, in_channels=1).eval()
    path = tmp_path / "backbone.pt"
    torch.save(backbone_payload(model), path)
    spec = backbone_spec(model)
    x = torch.randn(2, 1, side, side)
    plain = timm_network(spec).eval()
    plain.load_state_dict(torch.load(path, weights_only=True), strict=True)
    name, kwargs = arch.removeprefix("timm:"), spec["timm_kwargs"]
    overlay = timm.create_model(name, num_classes=0, in_chans=1, pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()  # fmt: skip
    with torch.no_grad():
        want = model.forward_features(x)
        assert torch.allclose(plain(x), want, atol=1e-5) and torch.allclose(overlay(x), want, atol=1e-5)
    assert any("strict=True" in line for line in timm_recipe(spec, str(path)))
    (tmp_path / "backbone.json").write_text('{"spec": ' + __import__("json").dumps(spec) + "}")
    with torch.no_grad():
        assert torch.allclose(load_exported(path)(x), want, atol=1e-5)


def test_a_timm_state_dict_starts_the_backbone_and_its_classifier_is_ignored():
    source = timm.create_model("resnet10t")  # with its 1000-class fc, as timm saves it
    model = create_model("timm:resnet10t", [4], input_size=16)
    heads = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("heads.")}
    load_backbone(model, source.state_dict())
    state = model.state_dict()
    assert all(
        torch.equal(state[f"body.{k}"], v) for k, v in source.state_dict().items() if not k.startswith("fc.")
    )
    assert all(torch.equal(state[k], v) for k, v in heads.items())


def test_unknown_name_and_missing_extra(monkeypatch):
    with pytest.raises(
        ValueError, match=r"timm has no model 'resnet_nope'; list them with .*timm.list_models"
    ):
        create_model("timm:resnet_nope", [3])
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now fails, as without the extra
    with pytest.raises(ValueError, match=r"--arch timm:resnet10t needs timm: pip install 'sela\[timm\]'"):
        create_model("timm:resnet10t", [3])


@pytest.mark.slow
def test_a_timm_run_through_the_commands_and_back_in_with_init(tmp_path, capsys):
    from PIL import Image

    from sela.cli import main

    run, exp = tmp_path / "run", tmp_path / "w.pt"
    tiny = ["--epochs", "1", "--label-updates", "2", "--heads", "2", "--clusters", "10", "--no-progress"]
    assert main(["train", "--arch", "timm:resnet10t", "--out", str(run), *tiny]) == 0
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(torch.randint(0, 255, (20, 20, 3), dtype=torch.uint8).numpy()).save(
            tmp_path / "imgs" / f"{i}.png"
        )
    assert main(["eval", str(run), "--no-linear"]) == 0
    assert main(["labels", str(run), "-o", str(tmp_path / "l.csv")]) == 0
    assert main(["embed", str(run), str(tmp_path / "imgs"), "-o", str(tmp_path / "e.npy")]) == 0
    assert main(["export", str(run), "-o", str(exp)]) == 0
    assert "timm keys" in capsys.readouterr().out
    assert (
        main(["train", "--init", str(exp), "--epochs", "0", "--out", str(tmp_path / "ep0"), *tiny[2:]]) == 0
    )
    config = __import__("json").loads((tmp_path / "ep0" / "config.json").read_text())
    assert (
        config["model"]["arch"] == "timm:resnet10t"
    )  # from the JSON that sela export wrote next to the file
