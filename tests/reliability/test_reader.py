"""Issue 30, part A: one reader for every command, and no silent wrong result from a folder.

``zoo`` is a folder that holds every kind of file a user's folder can hold: an EXIF-rotated JPEG, RGBA,
LA and P-with-transparency PNGs, a 16-bit PNG, a CMYK JPEG, a truncated JPEG, a zero-byte file, a text
file named .jpg, a dangling link, a directory loop, a file name that is not UTF-8, a PNG whose header
says 13,000 x 13,000 px, and a sela run directory and report inside the data. The other tests build
the smaller folder their case needs. Case numbers are those of issue 30.
"""

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sela.data import load_folder, make_loader
from sela.data.cache import cache_dir
from sela.data.reader import ImageReadError, decode_image
from sela.export import list_images, read_images, write_embedding

pytestmark = pytest.mark.usefixtures("one_thread")

NON_UTF8 = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
BAD = ("truncated.jpg", "empty.png", "notes.jpg", "dangling.png", "huge.png")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SELA_NO_CACHE", raising=False)
    monkeypatch.delenv("SELA_CACHE_GB", raising=False)


def _png(path: Path, array: np.ndarray, mode: str | None = None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, **save)
    return path


def _rgb(seed: int, h: int = 12, w: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def huge_png_header(path: Path, side: int = 13_000) -> Path:
    """A PNG whose header says side x side grey px, with one tiny IDAT: cheap to write, 169 MB to decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1))) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def rotated_jpeg(path: Path) -> Path:
    """A 20 (w) x 10 (h) JPEG, left half white, stored with EXIF orientation 6: it is shown 10 x 20."""
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, exif=exif, quality=95)
    return path


def transparent_pngs(folder: Path) -> list[Path]:
    """Fully transparent RGBA, LA and P (palette with a transparent index) PNGs, stored black."""
    zeros = np.zeros((8, 8), np.uint8)
    rgba = _png(folder / "rgba.png", np.zeros((8, 8, 4), np.uint8), "RGBA")
    la = _png(folder / "la.png", np.stack([zeros, zeros], -1), "LA")
    p = Image.fromarray(zeros, "L").convert("P")
    p.save(folder / "p_trns.png", transparency=0)
    return [rgba, la, folder / "p_trns.png"]


@pytest.fixture
def zoo(tmp_path) -> Path:
    root = tmp_path / "zoo"
    for i in range(3):
        _png(root / f"plain{i}.png", _rgb(i))
    rotated_jpeg(root / "rotated.jpg")
    transparent_pngs(root)
    _png(root / "deep16.png", (np.arange(144, dtype=np.uint16).reshape(12, 12) * 400))
    Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # red
    good = (root / "plain0.png").read_bytes()
    Image.fromarray(_rgb(7, 64, 64)).save(root / "full.jpg", quality=90)
    (root / "truncated.jpg").write_bytes((root / "full.jpg").read_bytes()[:600])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("these are my notes, not a picture")
    (root / "dangling.png").symlink_to(root / "gone.png")
    (root / "sub").mkdir()
    _png(root / "sub" / "inner.png", _rgb(8))
    (root / "sub" / "loop").symlink_to(root)  # a directory loop
    (root / NON_UTF8).write_bytes(good)
    huge_png_header(root / "huge.png")
    run = root / "run"  # a sela run inside the data, with its plots
    _png(run / "clusters.png", _rgb(9))
    (run / "checkpoint.pt").write_bytes(b"")
    _png(run / "report" / "sizes.png", _rgb(10))
    report = root / "report"
    _png(report / "top_clusters.png", _rgb(11))
    (report / "index.html").write_text("<html></html>")
    return root


READABLE = {
    "plain0.png",
    "plain1.png",
    "plain2.png",
    "rotated.jpg",
    "rgba.png",
    "la.png",
    "p_trns.png",
    "deep16.png",
    "cmyk.jpg",
    "full.jpg",
    "inner.png",
    NON_UTF8,
}


def test_zoo_reads_every_kind_of_file_and_names_what_it_skips(zoo):
    """Cases 10, 11, 12, 13, 21: one warning names the unreadable files; loops, run dirs left out."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = load_folder(zoo, image_size=16)
    assert {os.path.basename(p) for p in d.paths} == READABLE and len(d.paths) == len(READABLE)
    assert sorted(os.path.basename(s.split(" (")[0]) for s in d.skipped) == sorted(BAD)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].startswith("could not read 5 image(s)")
    assert not any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)
    assert "huge.png (13000 x 13000 px is above the limit" in messages[0]
    with pytest.raises(ValueError, match="could not read 5 image.*truncated.jpg"):
        load_folder(zoo, image_size=16, strict=True)
    again = load_folder(zoo, image_size=16)  # from the cache: the non-UTF-8 name is in its key
    assert torch.equal(again.images, d.images) and again.skipped == d.skipped


def test_embed_reads_exactly_as_train(zoo, tmp_path):
    """Case 14 and "one reader": ``sela embed``'s reader gives train's pixels, skipping the same files."""
    with pytest.warns(UserWarning):
        d = load_folder(zoo, image_size=16, cache=False)
    x, paths, failed = read_images(list_images(zoo), 16)
    assert paths == d.paths and torch.equal(x, d.images) and failed == d.skipped


def test_exif_orientation_is_applied(tmp_path):
    """Case 4: a photo stored sideways with an EXIF orientation is read upright."""
    a = decode_image(rotated_jpeg(tmp_path / "r.jpg"))
    assert a.shape == (20, 10, 3)  # shown 10 wide, 20 high
    assert a[:8].mean() > 200 and a[12:].mean() < 50  # orientation 6: the stored left half is now on top
    b = decode_image(tmp_path / "r.jpg", (6, 6))
    assert b.shape == (6, 6, 3) and b[:2].mean() > 200


def test_transparent_pixels_are_grey_not_black(tmp_path):
    """Case 5: RGBA, LA and P-with-transparency: transparent pixels on neutral grey."""
    for path in transparent_pngs(tmp_path):
        a = decode_image(path)
        assert a.shape == (8, 8, 3) and (a == 128).all(), path.name
    half = np.zeros((4, 4, 4), np.uint8)
    half[..., 0], half[..., 3] = 255, 128  # half-transparent red
    got = decode_image(_png(tmp_path / "half.png", half, "RGBA"))[0, 0]
    assert abs(int(got[0]) - 191) <= 1 and abs(int(got[1]) - 64) <= 1


@pytest.mark.parametrize(
    "mode,suffix",
    [
        ("1", ".png"),
        ("L", ".png"),
        ("P", ".png"),
        ("RGB", ".png"),
        ("I;16", ".png"),
        ("I", ".tif"),
        ("F", ".tif"),
        ("CMYK", ".jpg"),
        ("CMYK", ".tif"),
        ("YCbCr", ".jpg"),
        ("LA", ".png"),
        ("RGBA", ".webp"),
    ],
)
def test_every_mode_decodes_to_rgb(tmp_path, mode, suffix):
    path = tmp_path / f"x{suffix}"
    Image.new(mode, (9, 7)).save(path)
    a = decode_image(path)
    assert a.shape == (7, 9, 3) and a.dtype == np.uint8


def test_premultiplied_modes(tmp_path):
    from sela.data.reader import to_rgb

    for mode in ("La", "PA", "RGBa"):  # cannot be saved as PNG; PIL's convert("RGB") raises for La
        assert np.asarray(to_rgb(Image.new(mode, (3, 3)))).shape == (3, 3, 3), mode


def test_test_split_lacking_a_class_keeps_train_ids(tmp_path):
    """Case 2: class ids by name across splits, not per split."""
    root = tmp_path / "ds"
    for split, classes in (("train", "abc"), ("test", "ac")):
        for c in classes:
            _png(root / split / c / "0.png", _rgb(ord(c)))
    train, test = load_folder(root, "train"), load_folder(root, "test")
    assert train.classes == test.classes == ["a", "b", "c"]
    assert test.targets.tolist() == [0, 2]
    assert [test.classes[t] for t in test.targets] == ["a", "c"]


def test_a_stray_file_at_the_class_level_is_named_not_unlabelling(tmp_path):
    """Case 3: ``train/preview.png`` beside the class folders: a warning naming it, the split labelled."""
    root = tmp_path / "ds"
    for c in "ab":
        for i in range(3):
            _png(root / "train" / c / f"{i}.png", _rgb(i))
    _png(root / "train" / "preview.png", _rgb(5))
    with pytest.warns(UserWarning, match="left out 1 image.*preview.png"):
        d = load_folder(root)
    assert d.classes == ["a", "b"] and d.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert not any("preview" in p for p in d.paths)


def test_a_flat_folder_with_a_subfolder_stays_flat(tmp_path):
    for i in range(4):
        _png(tmp_path / "flat" / f"{i}.png", _rgb(i))
    _png(tmp_path / "flat" / "thumbs" / "t.png", _rgb(9))
    d = load_folder(tmp_path / "flat")
    assert len(d) == 5 and d.targets is None


def test_directory_loop_and_dangling_link(tmp_path):
    """Cases 10 and 11: a link loop is walked once; a dangling link is skipped like a corrupt file."""
    root = tmp_path / "ds"
    _png(root / "a" / "0.png", _rgb(0))
    _png(root / "b" / "0.png", _rgb(1))
    (root / "a" / "loop").symlink_to(root / "a")
    (root / "a" / "to_b").symlink_to(root / "b")  # b reached twice: read once
    (root / "b" / "gone.png").symlink_to(root / "nowhere.png")
    with pytest.warns(UserWarning, match="could not read 1 image.*gone.png"):
        d = load_folder(root)
    assert len(d) == 2 and d.targets.tolist() == [0, 1]
    with pytest.raises(ValueError, match="gone.png"):
        load_folder(root, strict=True)


def test_non_utf8_name_trains_and_is_written_back(tmp_path):
    """Case 12: a Latin-1 file name loads (cache on), and its path is written and read back as bytes."""
    folder = tmp_path / "ds"
    _png(folder / NON_UTF8, _rgb(0))
    _png(folder / "b.png", _rgb(1))
    d = load_folder(folder)
    assert any(p.endswith(NON_UTF8) for p in d.paths)
    from sela.rundir import read_labels_csv, write_labels_csv

    table = read_labels_csv(
        write_labels_csv(tmp_path / "labels.csv", torch.zeros(1, 2, dtype=torch.long), paths=d.paths)
    )
    assert len(table.labels[0]) == 2
    out = write_embedding(tmp_path / "e.npy", torch.zeros(2, 3), d.paths)
    assert list_images(out[1]) == d.paths


def test_run_directories_inside_the_data_are_not_scanned(tmp_path):
    """Case 13: ``sela train --data-dir . --out run``: the run's plots and a report are never images."""
    root = tmp_path / "data"
    for i in range(3):
        _png(root / f"{i}.png", _rgb(i))
    run = root / "run"
    _png(run / "curves.png", _rgb(5))
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    _png(run / "report" / "clusters" / "c00000.png", _rgb(6))
    _png(root / "rep" / "top_clusters.png", _rgb(7))
    (root / "rep" / "index.html").write_text("")
    assert len(load_folder(root)) == 3
    assert len(list_images(root)) == 3


def test_list_images_follows_links_reads_bom_and_writes_readable_paths(tmp_path, monkeypatch):
    """Case 17: directory links followed like the training scan, a BOM list, paths readable back."""
    _png(tmp_path / "imgs" / "00.png", _rgb(0))
    _png(tmp_path / "other" / "01.png", _rgb(1))
    (tmp_path / "imgs" / "linked").symlink_to(tmp_path / "other")
    monkeypatch.chdir(tmp_path)
    found = list_images("imgs")
    assert found == [str(tmp_path / "imgs" / "00.png"), str(tmp_path / "imgs" / "linked" / "01.png")]
    (tmp_path / "list.txt").write_text("imgs/00.png\n", encoding="utf-8-sig")  # Windows Notepad's BOM
    assert list_images("list.txt") == [str(tmp_path / "imgs" / "00.png")]
    out = write_embedding(tmp_path / "out" / "e.npy", torch.zeros(2, 3), found)
    monkeypatch.chdir(tmp_path / "out")
    assert list_images(out[1]) == found  # the paths sela embed wrote read back from anywhere


def test_embed_and_labels_skip_a_truncated_jpeg(trained_run, tmp_path):
    """Case 14: ``sela embed``/``sela labels --images`` skip it with a warning, keep the other batches."""
    from sela.export import embed_images, label_images
    from sela.runs import load_run

    folder = tmp_path / "imgs"
    for i in range(5):
        _png(folder / f"{i}.png", _rgb(i, 20, 20))
    Image.fromarray(_rgb(9, 64, 64)).save(tmp_path / "full.jpg")
    (folder / "2_truncated.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:500])
    run = load_run(trained_run, test_split=False)
    with pytest.warns(UserWarning, match="could not read 1 image.*2_truncated.jpg"):
        features, paths = embed_images(run, folder, batch_size=2, progress=False)
    assert features.shape[0] == len(paths) == 5 and not any("truncated" in p for p in paths)
    with pytest.warns(UserWarning, match="2_truncated.jpg"):
        _, _, labels = label_images(run, folder, tmp_path / "l.csv", progress=False)
    assert labels.shape[1] == 5


def test_streamed_corrupt_file_with_workers_is_named(tmp_path):
    """Case 15: streamed, two workers: strict=False honoured (grey stand-in); strict names the file."""
    root = tmp_path / "ds"
    for i in range(4):
        _png(root / f"{i}.png", _rgb(i))
    (root / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # damaged after it was listed as an image
    d = load_folder(root, in_memory=False, image_size=8)
    images, _ = next(iter(make_loader(d, batch_size=4, num_workers=2)))
    assert images.shape == (4, 3, 8, 8) and (images[3] == 128).all()
    strict = load_folder(root, in_memory=False, image_size=8, strict=True)
    with pytest.raises(ImageReadError) as err:
        next(iter(make_loader(strict, batch_size=4, num_workers=2)))
    message = str(err.value)
    assert message.startswith("could not read ") and "3.png" in message and "\n" not in message
    assert "Caught" not in message


def test_huge_images_are_refused_or_reduced_by_name(tmp_path):
    """Case 21: a 13,000 x 13,000 PNG is refused before decoding; a JPEG above the budget is reduced."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        with pytest.raises(ImageReadError, match="huge.png .13000 x 13000 px is above the limit"):
            decode_image(huge_png_header(tmp_path / "huge.png"))
    Image.fromarray(_rgb(0, 400, 400)).save(tmp_path / "big.jpg")
    a = decode_image(tmp_path / "big.jpg", max_pixels=20_000)
    assert a.shape[0] * a.shape[1] <= 20_000
    with pytest.raises(ImageReadError, match="big.png"):
        decode_image(_png(tmp_path / "big.png", _rgb(0, 400, 400)), max_pixels=20_000)


# ------------------------------------------------------------------------------------------------ cache


def _one_image_folder(folder: Path, seed: int) -> Path:
    _png(folder / "0.png", _rgb(seed))
    _png(folder / "1.png", _rgb(seed + 1))
    return folder


def test_cache_sees_a_file_replaced_with_its_size_and_mtime(tmp_path):
    """Case 6: same size, mtime restored: the new pixels, not the cached ones."""
    folder = _one_image_folder(tmp_path / "ds", 0)
    first = load_folder(folder)
    path = folder / "0.png"
    st = path.stat()
    replacement = _png(tmp_path / "r.png", _rgb(50)).read_bytes()
    assert len(replacement) == st.st_size  # random 12 x 12 RGB PNGs: the same size
    path.write_bytes(replacement)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = load_folder(folder)
    assert not torch.equal(second.images[0], first.images[0])
    assert torch.equal(second.images[0], torch.from_numpy(_rgb(50)).permute(2, 0, 1))


def test_cache_is_private(tmp_path):
    """Case 22: 0700 folder, 0600 files."""
    load_folder(_one_image_folder(tmp_path / "ds", 0))
    (entry,) = cache_dir().glob("*.pt")
    assert cache_dir().stat().st_mode & 0o777 == 0o700 and entry.stat().st_mode & 0o777 == 0o600


def test_cache_is_bounded_oldest_evicted(tmp_path, monkeypatch):
    """What to build 4: a size bound, the least recently used entry goes first."""
    monkeypatch.setenv("SELA_CACHE_GB", str(3000 / 2**30))  # about 3 kB: room for one tiny entry
    load_folder(_one_image_folder(tmp_path / "a", 0))
    load_folder(_one_image_folder(tmp_path / "b", 5))
    (entry,) = cache_dir().glob("*.pt")
    assert "-b-" in entry.name


def test_cache_write_failure_only_warns_and_leaves_no_tmp(tmp_path, monkeypatch):
    """Case 19: torch.save raising RuntimeError (a full disk) warns; no .tmp file stays."""

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.warns(UserWarning, match="could not write cache"):
        d = load_folder(_one_image_folder(tmp_path / "ds", 0))
    assert len(d) == 2 and list(cache_dir().iterdir()) == []


def test_no_cache_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("SELA_NO_CACHE", "1")
    load_folder(_one_image_folder(tmp_path / "ds", 0))
    assert not cache_dir().exists() or not list(cache_dir().iterdir())
