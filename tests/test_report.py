"""Tests for sela.report: cluster ordering, the PNG grids and the static HTML report."""

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from sela.data import ImageSet
from sela.report import cluster_table, render_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome")  # `make browser` installs Debian's chromium


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.ids = [], {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("href", "src"):
            if key in attrs:
                self.links.append(attrs[key])
        if "id" in attrs:
            self.ids[attrs["id"]] = attrs


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text())
    return parser


def check_links(folder: Path) -> int:
    """Every href/src of every page resolves to a file (and its #anchor to an id); returns the count."""
    count = 0
    for page in folder.glob("*.html"):
        for link in _parse(page).links:
            target, _, anchor = link.partition("#")
            assert (folder / target).is_file(), f"{page.name} links to missing {link}"
            if anchor:
                assert anchor in _parse(folder / target).ids, f"{page.name}: no #{anchor} in {target}"
            count += 1
    return count


def _imageset(n=300, k=12, channels=1, stream=False):
    """Images whose cluster is known: image i shows its class as a brightness level."""
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 5, (n,), generator=gen)
    images = (targets * 50).to(torch.uint8)[:, None, None, None].expand(n, channels, 6, 6).contiguous()
    if not stream:
        return ImageSet(images=images, targets=targets, classes=list("abcde"))

    class Stream(Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return images[i], i

    return ImageSet(images=None, targets=targets, stream=Stream(), mean=(0.5,), std=(0.5,))


def test_cluster_table_orders_by_purity_then_by_size():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    truth = torch.tensor([0, 0, 1, 1, 3, 3, 2, 2, -1])  # -1: unlabelled, counts for size only
    table = cluster_table(labels, 4, truth)
    assert [(c.cluster, c.size, c.majority) for c in table] == [(2, 3, 2), (1, 2, 3), (0, 4, 0), (3, 0, None)]
    assert table[0].purity == 1.0 and table[2].purity == 0.5
    by_size = cluster_table(labels, 4)
    assert [c.cluster for c in by_size] == [0, 2, 1, 3] and by_size[0].purity is None


def test_render_report_files_links_and_paging(tmp_path):
    imageset = _imageset()
    gen = torch.Generator().manual_seed(1)
    noisy = torch.where(torch.rand(300, generator=gen) < 0.3, torch.randint(0, 12, (300,), generator=gen), 0)
    labels = torch.stack([imageset.targets * 2 + noisy % 2, torch.randint(0, 7, (300,), generator=gen)])
    labels[0, :5] = 10  # clusters 0..10 used, 11 empty
    index = render_report(
        imageset, labels, [12, 7], tmp_path / "r", head=0, per_page=4, samples=5, top=6, info={"run": "x"}
    )
    out = tmp_path / "r"
    assert index == out / "index.html"
    for name in ("sizes.png", "top_clusters.png", "page_001.html", "page_003.html"):
        assert (out / name).is_file()
    assert not (out / "page_004.html").exists()  # 11 non-empty clusters, 4 a page
    strips = sorted(p.name for p in (out / "clusters").glob("*.png"))
    assert len(strips) == 11 and "c00011.png" not in strips
    with Image.open(out / "clusters" / "c00000.png") as strip:
        assert strip.height == 60 and strip.width == 5 * 60 + 4 * 2  # 6 px enlarged 10x, 5 samples
    assert check_links(out) > 20
    # prev / next chain visits every page once, and every non-empty cluster appears on one page
    page, seen, clusters = "page_001.html", [], []
    while page:
        seen.append(page)
        parsed = _parse(out / page)
        clusters += [int(i[1:]) for i in parsed.ids if re.fullmatch(r"c\d+", i)]
        page = parsed.ids.get("next", {}).get("href")
    assert seen == ["page_001.html", "page_002.html", "page_003.html"]
    assert sorted(clusters) == list(range(11))
    text = index.read_text()
    assert "empty clusters: 11" in text and "purity" in text and "<th>run</th><td>x</td>" in text


def test_render_report_streamed_and_unlabelled(tmp_path):
    imageset = _imageset(n=40, stream=True)
    labels = torch.arange(40)[None] % 4
    render_report(imageset, labels, [4], tmp_path, per_page=10, samples=3)
    assert check_links(tmp_path) > 0
    unlabelled = ImageSet(images=_imageset(n=40).images)
    render_report(unlabelled, labels, [4], tmp_path / "u")
    assert "order</th><td>size" in (tmp_path / "u" / "index.html").read_text()


def test_render_report_rejects_bad_input(tmp_path):
    imageset = _imageset(n=20)
    labels = torch.zeros(2, 20, dtype=torch.long)
    with pytest.raises(ValueError, match="--head 2 does not exist"):
        render_report(imageset, labels, [3, 3], tmp_path, head=2)
    with pytest.raises(ValueError, match="labels must be"):
        render_report(imageset, labels[:, :5], [3, 3], tmp_path)


def _browser() -> str:
    """A headless-capable browser; skip without one, but fail on CI (``CI=true``), where it must run."""
    found = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if found is None:
        reason = f"no browser ({', '.join(BROWSERS)}) on PATH; `make browser` installs chromium"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)
    return found


def test_report_renders_in_headless_chromium(tmp_path):
    browser = _browser()
    render_report(_imageset(channels=3), _imageset().targets[None], [5], tmp_path / "r")
    shot = tmp_path / "shot.png"
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1000,800",
        (tmp_path / "r" / "index.html").as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"{browser} wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    with Image.open(shot) as img:
        colours = img.convert("L").getextrema()
    assert colours[0] < colours[1]  # not a blank page
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
