"""sela embed (features of images from a run's backbone) and sela export (the backbone for use without sela)."""

import csv
import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from sela.cli import main
from sela.export import load_images
from sela.models import create_model
from sela.models.export import backbone_payload, load_exported, torchvision_resnet
from sela.runs import load_run

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = ["--device", "cpu"]


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial running statistics, so that an export that loses them shows in the features."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _fake_run(path, arch="convnet", **kwargs):
    """A run directory as `sela train` leaves it, without training (random weights), on digits."""
    torch.manual_seed(0)
    model = create_model(arch, [10, 6], input_size=16, **kwargs)
    _randomise_bn(model)
    config = {"dataset": "digits", "data_dir": None, "image_size": None, "arch": arch}
    path.mkdir(parents=True, exist_ok=True)
    ckpt = {"format": 2, "model_spec": model.spec, "model": model.state_dict(), "config": config}
    torch.save(ckpt, path / "checkpoint.pt")
    (path / "config.json").write_text(json.dumps(config))
    return path


def _images(folder, n=7):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def _expected(run_dir, folder, layer=None):
    run = load_run(run_dir, test_split=False)
    paths = sorted(str(p) for p in folder.glob("*.png"))
    x = run.transform(load_images(paths, run.image_size, channels=run.train_set.channels))
    with torch.no_grad():
        f = run.model.forward_features(x) if layer is None else run.model.features_by_layer(x, layer)
    return f, paths


# ------------------------------------------------------------------------------------------------- embed


@pytest.fixture(scope="module")
def convnet_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    return _fake_run(root / "run", widths=[8, 16]), _images(root / "imgs")


def test_embed_writes_npy_pt_and_csv_with_the_paths(convnet_run, tmp_path, capsys):
    run_dir, folder = convnet_run
    expected, paths = _expected(run_dir, folder)  # (7, 16)
    for name in ("f.npy", "f.pt", "f.csv"):
        out = tmp_path / name
        args = ["embed", str(run_dir), str(folder), "-o", str(out), "--batch-size", "3", "--no-progress"]
        assert main([*args, *CPU]) == 0
        assert f"wrote {out}: 7 images x 16 features" in capsys.readouterr().out
        if name == "f.npy":
            got = torch.from_numpy(np.load(out))
            assert (tmp_path / "f.paths.txt").read_text().splitlines() == paths
        elif name == "f.pt":
            record = torch.load(out, weights_only=True)
            got = record["features"]
            assert record["paths"] == paths
        else:
            rows = list(csv.reader(out.open()))
            assert rows[0] == ["path", *(f"f{d}" for d in range(16))]
            assert [r[0] for r in rows[1:]] == paths
            got = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]])
        assert got.dtype == torch.float32 and got.shape == (7, 16)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_embed_a_layer_and_a_file_list(convnet_run, tmp_path):
    run_dir, folder = convnet_run
    expected, paths = _expected(run_dir, folder, layer="block1")  # (7, 8)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(paths[:4]) + "\n")
    out = tmp_path / "f.pt"
    assert main(["embed", str(run_dir), str(listing), "-o", str(out), "--layer", "block1", *CPU]) == 0
    record = torch.load(out, weights_only=True)
    assert record["paths"] == paths[:4]
    torch.testing.assert_close(record["features"], expected[:4], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "case, message",
    [
        ("suffix", "end the name with one"),
        ("directory", "is a directory"),
        ("no run", "does not exist"),
        ("no images", "no images under"),
        ("missing images", "missing does not exist"),
        ("layer", "is not a layer of convnet"),
    ],
)
def test_embed_bad_input_is_one_line(convnet_run, tmp_path, capsys, case, message):
    run_dir, folder = convnet_run
    (tmp_path / "empty").mkdir()
    source, images, out, extra = str(run_dir), str(folder), str(tmp_path / "f.npy"), []
    if case == "suffix":
        out = str(tmp_path / "f.json")
    elif case == "directory":
        out = str(tmp_path)
    elif case == "no run":
        source = str(tmp_path / "missing")
    elif case == "no images":
        images = str(tmp_path / "empty")
    elif case == "missing images":
        images = str(tmp_path / "missing")
    else:
        extra = ["--layer", "layer9"]
    assert main(["embed", source, images, "-o", out, *CPU, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sela: error:") and message in err and "\n" not in err
    assert not (tmp_path / "f.npy").exists()


# ------------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize(
    "arch, side, c", [("resnet18", 64, 3), ("resnet18_cifar", 16, 3), ("resnet18", 64, 1)]
)
def test_resnet_export_loads_into_torchvision_strictly(arch, side, c):
    torch.manual_seed(0)
    model = create_model(arch, [10, 6], projector=(32,), in_channels=c).eval()
    _randomise_bn(model)
    state = backbone_payload(model)
    assert not any(k.startswith(("heads.", "projector.", "fc.")) for k in state)
    m = torchvision.models.resnet18()
    m.fc = nn.Identity()
    if arch.endswith("_cifar"):
        m.conv1 = nn.Conv2d(c, 64, 3, stride=1, padding=1, bias=False)
        m.maxpool = nn.Identity()
    elif c != 3:
        m.conv1 = nn.Conv2d(c, 64, 7, stride=2, padding=3, bias=False)
    m.load_state_dict(state, strict=True)
    x = torch.randn(2, c, side, side)
    with torch.no_grad():
        expected = model.forward_features(x)
        torch.testing.assert_close(m.eval()(x), expected)
    built = torchvision_resnet({"arch": arch, "in_channels": c})  # sela's builder of the same network
    built.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(built.eval()(x), expected)


def test_export_of_a_resnet_run_and_its_load_recipe(tmp_path, capsys):
    run_dir = _fake_run(tmp_path / "run", "resnet18_cifar")
    out = tmp_path / "w.pt"
    assert main(["export", str(run_dir), "-o", str(out), *CPU]) == 0
    assert "resnet18_cifar backbone, D = 512, torchvision keys" in capsys.readouterr().out
    info = json.loads((tmp_path / "w.json").read_text())
    assert info["layout"] == "torchvision" and info["preprocess"]["image_size"] == 16
    assert info["preprocess"]["channels"] == 3 and len(info["preprocess"]["mean"]) == 3
    namespace = {"torch": torch, "torchvision": torchvision, "nn": nn}
    exec("\n".join(info["load"]), namespace)  # the recipe the JSON prints, as a user would paste it
    m = namespace["m"].eval()
    run = load_run(run_dir, test_split=False)
    x = run.transform(run.train_set.images[:3])
    with torch.no_grad():
        expected = run.model.forward_features(x)
        torch.testing.assert_close(m(x), expected)
        torch.testing.assert_close(load_exported(out)(x), expected)


def test_export_of_a_convnet_run_reloads_with_its_spec(tmp_path, capsys):
    run_dir = _fake_run(tmp_path / "run", widths=[8, 16], pools=[True, False], projector=[12])
    out = tmp_path / "w.pth"
    assert main(["export", str(run_dir), "-o", str(out), *CPU]) == 0
    assert "convnet backbone, D = 16, sela spec" in capsys.readouterr().out
    data = torch.load(out, weights_only=True)
    assert data["spec"]["widths"] == [8, 16] and "projector" not in data["spec"]
    assert not any(k.startswith(("heads.", "projector.")) for k in data["state_dict"])
    run = load_run(run_dir, test_split=False)
    x = run.transform(run.train_set.images[:3])
    with torch.no_grad():
        torch.testing.assert_close(load_exported(out)(x), run.model.forward_features(x))


@pytest.mark.parametrize("out", ["w.npy", "."])
def test_export_bad_output_is_one_line(tmp_path, capsys, out):
    run_dir = _fake_run(tmp_path / "run", widths=[8, 16])
    assert main(["export", str(run_dir), "-o", str(tmp_path / out), *CPU]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sela: error:") and "ending in .pt, .pth or .onnx" in err and "\n" not in err


@pytest.mark.parametrize(
    "arch, kwargs", [("convnet", {"widths": [8, 16], "projector": [12]}), ("resnet18_cifar", {})]
)
def test_onnx_export_gives_the_features_of_torch(tmp_path, capsys, arch, kwargs):
    """onnxruntime's features of the run's own images equal torch's (max abs difference < 1e-4), for any
    batch size; the JSON says the input, the preprocessing and the lines that run it."""
    ort = pytest.importorskip("onnxruntime")
    run_dir = _fake_run(tmp_path / "run", arch, **kwargs)
    out = tmp_path / "model.onnx"
    assert main(["export", str(run_dir), "-o", str(out), *CPU]) == 0
    run = load_run(run_dir, test_split=False)
    c, side, d = run.train_set.channels, run.image_size, run.model.feature_dim
    assert f"{arch} backbone, D = {d}, ONNX graph" in capsys.readouterr().out
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["layout"] == "onnx" and info["feature_dim"] == d and info["max_abs_difference"] < 1e-4
    assert info["input"] == {"name": "images", "shape": ["batch", c, side, side], "dtype": "float32"}
    assert info["output"] == {"name": "features", "shape": ["batch", d], "dtype": "float32"}
    assert info["preprocess"]["image_size"] == side and len(info["preprocess"]["mean"]) == c
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = run.transform(run.train_set.images[:n])  # (n, C, S, S)
        with torch.no_grad():
            expected = run.model.forward_features(x).numpy()  # (n, D)
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == (n, d) and np.abs(got - expected).max() < 1e-4
    namespace = {"x": x.numpy()}
    exec("\n".join(info["load"]), namespace)  # the JSON's lines, as a user would paste them
    assert np.abs(namespace["features"] - expected).max() < 1e-4
    first = out.read_bytes()
    assert main(["export", str(run_dir), "-o", str(out), *CPU]) == 0
    assert out.read_bytes() == first  # deterministic


def test_onnx_export_without_its_packages_is_one_line(tmp_path, capsys, monkeypatch):
    import sela.models.export

    monkeypatch.setattr(sela.models.export, "_ONNX_PACKAGES", ("onnx", "onnxruntime_not_installed"))
    run_dir = _fake_run(tmp_path / "run", widths=[8, 16])
    assert main(["export", str(run_dir), "-o", str(tmp_path / "m.onnx"), *CPU]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sela: error: an ONNX export needs onnxruntime_not_installed: pip install")
    assert "\n" not in err and not (tmp_path / "m.onnx").exists()
