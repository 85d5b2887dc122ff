"""Tests for sela.data datasets: digits, image folders (cached, streamed), torchvision formats offline."""

import pickle
import urllib.error
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import sela.data.datasets as datasets_module
import sela.data.folder as folder_module
from sela.data import DatasetNotFoundError, ImageSet, load_dataset, make_loader


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SELA_DATA", str(tmp_path / "no-data-here"))


def _write_image(path, size=(12, 12), colour=(10, 20, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(path)


def _tree(root, splits=("train", "test"), classes=("cat", "dog"), per_class=3, size=(12, 12)):
    for split in splits:
        for c, name in enumerate(classes):
            for i in range(per_class):
                _write_image(root / split / name / f"{i}.png", size, (40 * c, 10 * i, 200))
    return root


# --------------------------------------------------------------------------------------------- digits


def test_digits_splits():
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert train.images.shape == (1437, 3, 8, 8) and test.images.shape == (360, 3, 8, 8)
    assert train.images.dtype == torch.uint8 and int(train.images.max()) == 255
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # grey repeated over 3 channels
    assert train.targets.dtype == torch.int64 and set(train.targets.tolist()) == set(range(10))
    assert torch.bincount(test.targets).min() >= 35  # stratified: ~36 per class
    assert train.classes == [str(i) for i in range(10)] and train.name == "digits"
    assert train.mean == test.mean and len(train.mean) == 3 and 0 < train.std[0] < 1
    assert torch.equal(load_dataset("digits").images, train.images)  # deterministic split


def test_digits_resized_and_items_carry_index():
    d = load_dataset("digits", split="test", image_size=16)
    assert d.images.shape == (360, 3, 16, 16)
    image, index = d[5]
    assert index == 5 and torch.equal(image, d.images[5])
    batches = list(make_loader(d, batch_size=100))
    assert [len(b[1]) for b in batches] == [100, 100, 100, 60]
    assert batches[0][0].dtype == torch.uint8 and torch.equal(batches[1][1], torch.arange(100, 200))


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="cifar10"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="train, test"):
        load_dataset("digits", split="val")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=0)
    with pytest.raises(ValueError, match="root"):
        load_dataset("folder")


def test_imageset_validation():
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(images=torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="targets"):
        ImageSet(images=torch.zeros(2, 3, 4, 4, dtype=torch.uint8), targets=torch.zeros(3))
    s = ImageSet(images=torch.full((2, 1, 4, 4), 255, dtype=torch.uint8))
    assert s.mean == (1.0,) and len(s) == 2 and s.n_classes is None and "n=2" in repr(s)


# --------------------------------------------------------------------------------------------- folder


def test_folder_labelled_and_cached(tmp_path, monkeypatch):
    root = _tree(tmp_path / "ds")
    train = load_dataset("folder", root)
    assert train.images.shape == (6, 3, 12, 12) and train.classes == ["cat", "dog"]
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.paths[0].endswith("train/cat/0.png") and train.images[3, 0, 0, 0] == 40
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    test = load_dataset("folder", root, split="val")  # val falls back to test/
    assert len(test) == 6

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(folder_module, "decode_images", no_decoding)
    again = load_dataset("folder", root)
    assert torch.equal(again.images, train.images) and again.paths == train.paths
    _write_image(root / "train" / "cat" / "9.png")  # a new file invalidates the cache
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset("folder", root)


class _TouchOnLoad:
    """Unpickling this calls ``Path(marker).touch()``: a stand-in for code in a planted file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_folder_cache_with_a_planted_pickle_runs_no_code(tmp_path):
    root = _tree(tmp_path / "ds")
    first = load_dataset("folder", root)
    (cache,) = (tmp_path / "cache").glob("*.pt")
    marker = tmp_path / "MARKER"
    torch.save({"images": first.images, "evil": _TouchOnLoad(marker)}, cache)  # same name, planted content
    with pytest.warns(UserWarning, match="ignoring unreadable cache") as caught:
        again = load_dataset("folder", root)
    assert not marker.exists() and torch.equal(again.images, first.images)
    assert "\n" not in str(caught[0].message)
    torch.save({"a": 1}, cache)  # loads, but is not a cache
    with pytest.warns(UserWarning, match="not a sela folder cache"):
        again = load_dataset("folder", root)
    assert torch.equal(again.images, first.images)


def test_folder_flat_unlabelled(tmp_path):
    for i in range(4):
        _write_image(tmp_path / "flat" / f"{i}.jpg", colour=(i, i, i))
    _write_image(tmp_path / "flat" / "sub" / "x.png")
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    d = load_dataset("folder", tmp_path / "flat", cache=False)
    assert len(d) == 5 and d.targets is None and d.classes is None and d.n_classes is None
    with pytest.raises(DatasetNotFoundError, match="single 'train' split"):
        load_dataset("folder", tmp_path / "flat", split="test")


def test_folder_sizes(tmp_path):
    for i in range(3):
        _write_image(tmp_path / "mixed" / f"a{i}.png", (20, 20))
    _write_image(tmp_path / "mixed" / "b.png", (30, 10), mode="L")  # grey and another size
    d = load_dataset("folder", tmp_path / "mixed", cache=False)
    assert d.images.shape == (4, 3, 20, 20)  # the most common size
    d16 = load_dataset("folder", tmp_path / "mixed", image_size=16, cache=False)
    assert d16.images.shape == (4, 3, 16, 16)
    _write_image(tmp_path / "big" / "x.png", (200, 100))
    assert load_dataset("folder", tmp_path / "big", cache=False).images.shape == (1, 3, 64, 64)  # capped


def test_folder_unreadable_images(tmp_path):
    root = _tree(tmp_path / "ds", splits=("train",))
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "train" / "dog" / "empty.png").write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = load_dataset("folder", root)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "broken.jpg" in messages[0] and "empty.png" in messages[0]
    assert len(d) == 6 and len(d.paths) == 6 and d.targets.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.warns(UserWarning, match="could not read 2"):  # the cached copy remembers the failures
        load_dataset("folder", root)
    with pytest.raises(ValueError, match="broken.jpg"):
        load_dataset("folder", root, strict=True)


def test_folder_missing_or_empty(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does-not-exist"):
        load_dataset("folder", tmp_path / "does-not-exist")
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images found under .*empty"):
        load_dataset("folder", tmp_path / "empty")
    _tree(tmp_path / "only-train", splits=("train",))
    with pytest.raises(ValueError, match="no 'test' folder"):
        load_dataset("folder", tmp_path / "only-train", split="test")


def test_empty_data_dir_is_refused_not_the_current_directory(tmp_path, monkeypatch):
    _tree(tmp_path, splits=("train",))  # images below the current directory must not be picked up
    monkeypatch.chdir(tmp_path)
    for name in ("folder", "digits", "cifar10"):
        for root in ("", "  "):
            with pytest.raises(ValueError, match="empty string; pass the folder") as err:
                load_dataset(name, root)
            assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="empty string"):
        folder_module.load_folder("")


@pytest.mark.parametrize("stream", [False, True])
def test_folder_16_bit_png_is_scaled_not_clipped(tmp_path, stream):
    wide = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0..65472
    path = tmp_path / "ds" / "deep.png"
    path.parent.mkdir()
    Image.fromarray(wide).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # PIL opens it as 16-bit grey: the case it clips in convert()
    d = load_dataset("folder", tmp_path / "ds", image_size=32, in_memory=not stream, cache=False)
    got = (d.images[0] if not stream else d[0][0]).numpy().astype(np.int64)  # (3, 32, 32)
    assert (got == 255).mean() < 0.01  # clipping saturated 99.6 % of these pixels
    assert np.abs(got - (wide >> 8)[None]).max() <= 1
    assert np.array_equal(got[0], got[2])


def test_decode_wide_and_float_grey_modes(tmp_path):
    from sela.data.folder import decode_image

    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    cases = {
        "float01.tif": (Image.fromarray(ramp, "F"), ramp * 255),
        "int32.tif": (Image.fromarray((ramp * 1e6).astype(np.int32), "I"), ramp * 255),
        "flat.tif": (Image.fromarray(np.full((8, 8), -5.0, np.float32), "F"), np.zeros((8, 8))),
    }
    for name, (img, want) in cases.items():
        img.save(tmp_path / name)
        got = decode_image(str(tmp_path / name))
        assert got.shape == (8, 8, 3) and got.dtype == np.uint8, name
        assert np.abs(got[..., 1].astype(float) - want).max() <= 1, name


def test_folder_streaming(tmp_path):
    root = _tree(tmp_path / "ds", per_class=5, size=(40, 30))
    d = load_dataset("folder", root, in_memory=False, image_size=24)
    assert d.images is None and not d.in_memory and len(d) == 10 and d.targets.tolist() == [0] * 5 + [1] * 5
    image, index = d[7]
    assert image.shape == (3, 24, 24) and image.dtype == torch.uint8 and index == 7
    assert image[0, 0, 0] == 40  # class dog's colour
    images, indices = next(iter(make_loader(d, batch_size=4, shuffle=True, generator=torch.Generator())))
    assert images.shape == (4, 3, 24, 24) and indices.dtype == torch.int64
    assert len(d.mean) == 3 and not list((tmp_path / "cache").glob("*.pt"))


# -------------------------------------------------------------------------------- torchvision formats


def _cifar_batch(path, n, seed, label_key="labels"):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    data[:, :1024] = 255  # red plane
    data[:, 1024:] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"data": data, label_key: rng.integers(0, 10, n).tolist()}, f)


def test_cifar10_offline_parsing(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        _cifar_batch(folder / f"data_batch_{i}", 3, i)
    _cifar_batch(folder / "test_batch", 4, 9)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    train = load_dataset("cifar10", root=tmp_path, download=False)
    assert train.images.shape == (15, 3, 32, 32) and train.images.dtype == torch.uint8
    assert (train.images[:, 0] == 255).all() and (train.images[:, 1:] == 0).all()  # channel order kept
    assert train.classes == names and train.targets.dtype == torch.int64 and len(train.targets) == 15
    assert train.mean[0] == pytest.approx(0.4914)
    test = load_dataset("cifar10", root=tmp_path, split="test", download=False, image_size=16)
    assert test.images.shape == (4, 3, 16, 16)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_of_any_pickle_protocol_but_no_code(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": np.zeros((2, 3072), np.uint8), "labels": [1, 2], "filenames": [b"a.png", b"b.png"]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": [str(i) for i in range(10)]}, protocol)
    )
    assert load_dataset("cifar10", root=tmp_path, download=False).images.shape == (10, 3, 32, 32)
    marker = tmp_path / "MARKER"
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": _TouchOnLoad(marker)}, protocol=protocol))
    with pytest.raises(ValueError, match="data_batch_3 is not a CIFAR batch file .it refers to") as err:
        load_dataset("cifar10", root=tmp_path, download=False)
    assert not marker.exists() and "\n" not in str(err.value)
    (folder / "data_batch_3").write_bytes(b"\x80\x04")  # truncated
    with pytest.raises(ValueError, match="data_batch_3 is not a CIFAR batch file"):
        load_dataset("cifar10", root=tmp_path, download=False)


def test_cifar100_offline_parsing(tmp_path):
    folder = tmp_path / "cifar-100-python"
    _cifar_batch(folder / "train", 5, 0, label_key="fine_labels")
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    d = load_dataset("cifar100", root=tmp_path, download=False)
    assert d.images.shape == (5, 3, 32, 32) and len(d.classes) == 100


def test_svhn_and_stl10_offline_parsing(tmp_path):
    from scipy.io import savemat

    x = np.zeros((32, 32, 3, 4), np.uint8)
    x[:, :, 2] = 7  # blue plane
    savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [2], [3]], np.uint8)})
    svhn = load_dataset("svhn", root=tmp_path, split="test", download=False)
    assert svhn.images.shape == (4, 3, 32, 32) and (svhn.images[:, 2] == 7).all()
    assert svhn.targets.tolist() == [0, 1, 2, 3]

    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    images = np.zeros((2, 3, 96, 96), np.uint8)
    images[:, :, 0, :] = 200  # top row, stored column-major on disk
    images.transpose(0, 1, 3, 2).tofile(folder / "train_X.bin")
    np.array([1, 10], np.uint8).tofile(folder / "train_y.bin")
    np.zeros((3, 3, 96, 96), np.uint8).tofile(folder / "unlabeled_X.bin")
    (folder / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(10)))
    stl = load_dataset("stl10", root=tmp_path, download=False)
    assert stl.images.shape == (2, 3, 96, 96) and (stl.images[:, :, 0, :] == 200).all()
    assert stl.targets.tolist() == [0, 9] and len(stl.classes) == 10
    both = load_dataset("stl10", root=tmp_path, split="train+unlabeled", download=False)
    assert len(both) == 5 and both.targets.tolist() == [0, 9, -1, -1, -1]
    assert load_dataset("stl10", root=tmp_path, split="unlabeled", download=False).targets is None


def test_offline_error_names_url_and_place(tmp_path, monkeypatch):
    def offline(url, root, filename, md5, extract):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(datasets_module, "_download", offline)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", root=tmp_path / "c10")
    message = str(info.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert str(tmp_path / "c10") in message and "URLError" in message and "\n" not in message
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    with pytest.raises(DatasetNotFoundError, match="train_32x32.mat"):
        load_dataset("svhn", root=tmp_path, download=False)
    with pytest.raises(DatasetNotFoundError, match="no-data-here.stl10"):  # default root: $SELA_DATA/stl10
        load_dataset("stl10", download=False)
