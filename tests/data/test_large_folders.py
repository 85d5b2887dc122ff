"""Issue 31, part 4 (large folders): the decode progress bar, the memory budget setting that sends a folder
to the streamed path, and the histogram channel statistics."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sela.data import channel_stats, load_dataset, load_folder
from sela.data.folder import DEFAULT_MEMORY_GB, memory_budget
from sela.data.reader import decode_images, walk_images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SELA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SELA_NO_CACHE", raising=False)
    monkeypatch.delenv("SELA_MEMORY_GB", raising=False)


def _folder(root, n=6, size=(20, 16)):
    """``root/train/{a,b}/i.jpg`` and ``root/test/{a,b}/i.jpg``: n noisy JPEGs per split, and one sideways
    JPEG with the EXIF orientation that turns it upright."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for i in range(n):
            path = root / split / "ab"[i % 2] / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)).save(
            root / split / "a" / "turned.jpg", exif=exif
        )
    return root


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# -------------------------------------------------------------------------------------------- progress


def test_decode_bar_shows_the_count_and_rate_on_a_terminal(tmp_path, monkeypatch):
    paths = walk_images(str(_folder(tmp_path / "ds") / "train")).paths
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    images, ok, failed = decode_images(paths, None, 64, 2)
    shown = terminal.getvalue()
    assert len(ok) == 7 and not failed
    assert "decode" in shown and "7/7" in shown and "img/s" in shown


def test_decode_bar_is_off_without_a_terminal_or_when_switched_off(tmp_path, monkeypatch, capsys):
    paths = walk_images(str(_folder(tmp_path / "ds") / "train")).paths
    decode_images(paths, None, 64)  # pytest's captured stderr is not a terminal
    assert capsys.readouterr().err == ""
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    decode_images(paths, None, 64, progress=False)
    assert terminal.getvalue() == ""
    decode_images(paths, None, 64, progress=True)
    assert "7/7" in terminal.getvalue()


def test_load_folder_bar_on_the_first_decode_only(tmp_path, capsys):
    root = _folder(tmp_path / "ds")
    first = load_folder(str(root), progress=True)
    assert "decode" in capsys.readouterr().err
    second = load_folder(str(root), progress=True)  # a cache hit: nothing to decode
    assert "decode" not in capsys.readouterr().err
    assert torch.equal(first.images, second.images)


def test_no_progress_switches_the_decode_bar_off_in_sela_train(tmp_path, monkeypatch):
    """``--no-progress`` (runtime.progress False) reaches the folder's decoder; the default leaves it to
    the terminal (None)."""
    from sela.build import load_splits
    from sela.config import TrainConfig

    root = _folder(tmp_path / "ds")
    monkeypatch.setenv("SELA_NO_CACHE", "1")
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    cfg = TrainConfig()
    cfg.data.dataset, cfg.data.data_dir, cfg.runtime.progress = "folder", str(root), False
    load_splits(cfg)
    assert "decode" not in terminal.getvalue()
    cfg.runtime.progress = True
    load_splits(cfg)
    assert "decode" in terminal.getvalue()


def test_channels_first_decode_is_the_same_pixels(tmp_path):
    root = _folder(tmp_path / "ds")
    (root / "train" / "b" / "odd.png").parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (9, 31), (5, 6, 7)).save(root / "train" / "b" / "odd.png")  # fitted to the common size
    (root / "train" / "b" / "bad.jpg").write_bytes(b"not a JPEG")
    paths = walk_images(str(root / "train")).paths
    hwc, ok, failed = decode_images(paths, None, 64)
    chw, ok_first, failed_first = decode_images(paths, None, 64, channels_first=True)
    assert hwc.shape == (8, 16, 20, 3) and chw.shape == (8, 3, 16, 20) and chw.flags.c_contiguous
    assert np.array_equal(chw, hwc.transpose(0, 3, 1, 2)) and ok == ok_first and failed == failed_first
    assert len(failed) == 1 and "bad.jpg" in failed[0]
    none = decode_images([str(root / "train" / "b" / "bad.jpg")], None, 64, channels_first=True)[0]
    assert none.shape == (0, 3, 1, 1)


# ------------------------------------------------------------------------------------------ the budget


def test_memory_budget_setting(monkeypatch):
    assert memory_budget() == DEFAULT_MEMORY_GB
    monkeypatch.setenv("SELA_MEMORY_GB", " 0.5 ")
    assert memory_budget() == 0.5
    monkeypatch.setenv("SELA_MEMORY_GB", "")
    assert memory_budget() == DEFAULT_MEMORY_GB
    for bad in ("lots", "-1", "nan", "inf", "4GB"):
        monkeypatch.setenv("SELA_MEMORY_GB", bad)
        with pytest.raises(ValueError, match=r"\$SELA_MEMORY_GB must be a number of GiB >= 0.*" + bad):
            memory_budget()


def test_a_zero_budget_streams_the_same_pixels(tmp_path, monkeypatch):
    """``SELA_MEMORY_GB=0`` reaches ``load_dataset`` (what ``sela train`` calls): the folder is streamed,
    and the stream gives the pixels the in-memory path gives, the EXIF-turned file upright."""
    root = _folder(tmp_path / "ds", size=(40, 30))
    held = load_dataset("folder", root, image_size=24)
    monkeypatch.setenv("SELA_MEMORY_GB", "0")
    streamed = load_dataset("folder", root, image_size=24)
    assert held.in_memory and not streamed.in_memory and len(streamed) == len(held) == 7
    assert streamed.paths == held.paths and torch.equal(streamed.targets, held.targets)
    assert torch.equal(torch.stack([streamed[i][0] for i in range(len(streamed))]), held.images)
    assert load_folder(str(root), image_size=24, memory_budget_gb=1.0).in_memory  # the argument wins
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # the in-memory loads' one file; none streamed


def test_the_budget_counts_decoded_bytes(tmp_path):
    root = _folder(tmp_path / "ds", n=3)
    four = 4 * 3 * 24 * 24 / 2**30  # 4 images of 3 x 24 x 24 bytes, in GiB
    assert load_folder(str(root), image_size=24, memory_budget_gb=four).in_memory
    assert not load_folder(str(root), image_size=24, memory_budget_gb=four * 0.99).in_memory


# ---------------------------------------------------------------------------------------- statistics


def _float_stats(images):
    x = images.to(torch.float64).div(255).transpose(0, 1).reshape(images.shape[1], -1)  # (C, *)
    return x.mean(1).tolist(), x.std(1, correction=0).tolist()


@pytest.mark.parametrize("shape", [(300, 3, 8, 8), (5, 1, 3, 7), (1, 3, 1, 1)])
def test_channel_stats_equal_float64_sums(shape):
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean, std = channel_stats(images, chunk=7)
    ref_mean, ref_std = _float_stats(images)
    assert np.allclose(mean, ref_mean, rtol=0, atol=1e-12)
    assert np.allclose(std, np.maximum(ref_std, 1e-6), rtol=0, atol=1e-12)


def test_channel_stats_of_a_flat_image_keep_a_floor():
    mean, std = channel_stats(torch.full((4, 3, 5, 5), 51, dtype=torch.uint8))
    assert mean == pytest.approx((0.2, 0.2, 0.2), abs=1e-15) and std == (1e-6, 1e-6, 1e-6)
