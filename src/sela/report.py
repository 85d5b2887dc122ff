"""A browsable report of a run's clusters, and its images laid out as one folder per cluster.

``render_report`` (``sela show``) writes into one folder::

    index.html            summary, the size histograms, the top clusters, links to every page
    sizes.png             cluster sizes of every head (sorted, against the equal share N / K)
    top_clusters.png      the SeLa paper's figure: random members of the top clusters, one row each
    page_001.html ...     every non-empty cluster of the head, ``per_page`` a page, with prev / next links
    clusters/c00042.png   one strip of random members per cluster

Clusters are sorted by purity (the share of their majority class) when the images have ground truth, by
size otherwise. Plain HTML with a few lines of inline JavaScript (arrow keys turn the pages).

``write_cluster_folders`` (``sela labels --into DIR``) writes::

    007/                  the members of cluster 7: links to the original files (copies with ``copy``;
                          PNGs for images without files), named ``<row>_<file name>`` (row: the labels CSV's)
    007/_contact_sheet.jpg   up to 64 members, the most confident first, 8 a row
    index.html            every cluster with its size, mean confidence and contact sheet
    top_clusters.png      the most confident members of the largest clusters, one row each
    clusters.json         what sela wrote there (so that it may rewrite the folder, and nothing else)

A folder holding ``index.html`` and ``top_clusters.png`` is sela's output to the image reader, so
``sela train`` on a folder above it never sees the links as images a second time.

Letters: N images, H heads, K clusters of the shown head.
"""

from __future__ import annotations

import contextlib
import html
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

import sela
from sela.data import ImageSet
from sela.data.reader import decode_images
from sela.plots import cluster_grid, plot_cluster_sizes  # matplotlib with the Agg backend
from sela.rundir import RunWriteError, atomic_write, read_json, write_json

STRIP_HEIGHT = 64  # px: small images are enlarged (nearest neighbour) to at least this height


@dataclass
class ClusterInfo:
    """One cluster of a head: its id, size and (with ground truth) majority class and purity (0..1)."""

    cluster: int
    size: int
    majority: int | None = None
    purity: float | None = None


def cluster_table(labels: Tensor, n_clusters: int, truth: Tensor | None = None) -> list[ClusterInfo]:
    """Every cluster of (N,) ``labels``, sorted by purity then size (with ``truth``) or by size.

    ``truth`` is (N,) class ids, -1 for unlabelled images (they count for size, not for purity).
    """
    labels = torch.as_tensor(labels).long().cpu()
    sizes = torch.bincount(labels, minlength=n_clusters)  # (K,)
    infos = [ClusterInfo(k, int(sizes[k])) for k in range(n_clusters)]
    if truth is not None and bool((truth >= 0).any()):
        known = truth >= 0
        c = int(truth.max()) + 1
        counts = torch.zeros(n_clusters, c, dtype=torch.long)  # (K, C)
        counts.index_put_(
            (labels[known], truth[known].long()), torch.ones(int(known.sum()), dtype=torch.long), True
        )
        for info, row in zip(infos, counts, strict=True):
            if int(row.sum()):
                info.majority = int(row.argmax())
                info.purity = float(row.max()) / float(row.sum())
        return sorted(infos, key=lambda i: (-(i.purity or 0.0), -i.size, i.cluster))
    return sorted(infos, key=lambda i: (-i.size, i.cluster))


def gather_images(images: ImageSet, rows: Tensor) -> Tensor:
    """uint8 (n, C, H, W) of the given rows of an in-memory or streamed set."""
    rows = torch.as_tensor(rows).long()
    if images.in_memory:
        return images.images[rows]
    return torch.stack([images[int(i)][0] for i in rows])


def _members(labels: Tensor, cluster: int, count: int, gen: torch.Generator) -> Tensor:
    members = (labels == cluster).nonzero().flatten()
    return members[torch.randperm(len(members), generator=gen)[:count]]


def _save_strip(images: Tensor, path: Path, pad: int = 2) -> None:
    """uint8 (n, C, h, w) side by side on a white background, enlarged to ``STRIP_HEIGHT`` px if smaller."""
    n, c, h, w = images.shape
    scale = max(1, STRIP_HEIGHT // h)
    x = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)  # (n, C, sh, sw)
    sh, sw = h * scale, w * scale
    strip = torch.full((c, sh, n * (sw + pad) - pad), 255, dtype=torch.uint8)
    for i in range(n):
        strip[:, :, i * (sw + pad) : i * (sw + pad) + sw] = x[i]
    array = strip.permute(1, 2, 0).numpy()  # (sh, W, C)
    atomic_write(path, Image.fromarray(array[..., 0] if c == 1 else array).save)


def _class_name(info: ClusterInfo, classes: list[str] | None) -> str:
    if info.majority is None:
        return ""
    return classes[info.majority] if classes and info.majority < len(classes) else str(info.majority)


def _title(info: ClusterInfo, classes: list[str] | None) -> str:
    text = f"cluster {info.cluster}: {info.size} images"
    if info.purity is not None:
        text += f", {100 * info.purity:.0f}% {_class_name(info, classes)!r}"
    return text


_STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:72em}
img{image-rendering:pixelated;max-width:100%}table{border-collapse:collapse}
td,th{padding:.15em .6em;border-bottom:1px solid #ddd;text-align:left}
nav a{margin-right:1em}.cluster{margin:.6em 0 1.2em}h3{margin:.2em 0;font-size:1em}"""
_KEYS = """<script>document.addEventListener('keydown',function(e){var a=document.getElementById(
e.key==='ArrowLeft'?'prev':e.key==='ArrowRight'?'next':'');if(a)location.href=a.href;});</script>"""


_GENERATOR = '<meta name="generator" content="sela">'  # marks the pages sela wrote (and may remove)


def _remove_old_pages(out: Path) -> None:
    """Remove the page_*.html that an earlier report wrote into ``out`` (by sela's mark or its page
    navigation), so that a report with fewer pages leaves none of the old ones; other files stay."""
    for page in out.glob("page_*.html"):
        try:
            head = page.read_text(errors="replace")[:100_000]
        except OSError:
            continue
        if _GENERATOR in head or re.search(r"page \d+ of \d+</nav>", head):
            page.unlink(missing_ok=True)


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{_GENERATOR}<title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head>\n<body>\n{body}\n{_KEYS}\n</body></html>\n"
    )


def _check_arguments(
    labels: Tensor, n_clusters: list[int], n_images: int, *, head: int, per_page: int, samples: int, top: int
) -> None:
    """Raise ``ValueError`` for (H, N) ``labels`` of the wrong shape, a missing head or a count below 1."""
    if labels.ndim != 2 or labels.shape != (len(n_clusters), n_images):
        raise ValueError(
            f"labels must be (H, N) = ({len(n_clusters)}, {n_images}), got {tuple(labels.shape)}"
        )
    if not 0 <= head < len(n_clusters):
        raise ValueError(f"--head {head} does not exist; the run has heads 0..{len(n_clusters) - 1}")
    for name, value in (("per_page", per_page), ("samples", samples), ("top", top)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def _plot_top_clusters(
    images: ImageSet,
    top_rows: list[ClusterInfo],
    picks: dict[int, Tensor],
    path: Path,
    *,
    samples: int,
    seed: int,
) -> None:
    """The SeLa paper's figure: the picked members of each of ``top_rows``, one row per cluster."""
    rows = torch.cat([picks[c.cluster] for c in top_rows])  # (n,) image rows in the figure
    compact = torch.repeat_interleave(
        torch.tensor([c.cluster for c in top_rows]), torch.tensor([len(picks[c.cluster]) for c in top_rows])
    )  # (n,) the cluster of each
    cluster_grid(
        gather_images(images, rows),
        compact,
        [c.cluster for c in top_rows],
        path,
        per_cluster=samples,
        titles=[_title(c, images.classes).replace("cluster ", "c") for c in top_rows],
        seed=seed,
    )


def _nav(i: int, names: list[str]) -> str:
    """The navigation bar of page ``i`` (0-based) of ``names``: index, prev and next links."""
    nav = ['<a href="index.html" id="up">index</a>']
    if i > 0:
        nav.append(f'<a href="{names[i - 1]}" id="prev">&larr; prev</a>')
    if i + 1 < len(names):
        nav.append(f'<a href="{names[i + 1]}" id="next">next &rarr;</a>')
    return f"<nav>{''.join(nav)} page {i + 1} of {len(names)}</nav>"


def _write_pages(
    shown: list[ClusterInfo], out: Path, classes: list[str] | None, *, title: str, head: int, per_page: int
) -> list[str]:
    """Write ``shown``'s clusters ``per_page`` a page into ``out``; return the page file names in order."""
    pages = [shown[i : i + per_page] for i in range(0, len(shown), per_page)]
    names = [f"page_{i + 1:03d}.html" for i in range(len(pages))]
    for i, (page, name) in enumerate(zip(pages, names, strict=True)):
        nav_html = _nav(i, names)
        blocks = [
            f'<div class="cluster" id="c{c.cluster}"><h3>{html.escape(_title(c, classes))}</h3>'
            f'<img src="clusters/c{c.cluster:05d}.png" alt="cluster {c.cluster}"></div>'
            for c in page
        ]
        body = (
            f"{nav_html}\n<h2>{html.escape(title)}: head {head}</h2>\n" + "\n".join(blocks) + f"\n{nav_html}"
        )
        text = _page(f"{title}, page {i + 1}", body)
        atomic_write(out / name, lambda tmp, text=text: tmp.write_text(text))
    return names


def _facts(info: dict | None, *, head: int, k: int, n_empty: int, n_images: int, by_purity: bool) -> dict:
    """The key/value pairs at the top of the index: the caller's ``info``, then the head and its clusters."""
    return {
        **(info or {}),
        "head": head,
        "clusters": f"{k} ({n_empty} empty)",
        "images": n_images,
        "order": "purity (share of the majority class)" if by_purity else "size",
    }


def _cluster_rows(
    shown: list[ClusterInfo], page_of: dict[int, str], classes: list[str] | None, *, by_purity: bool
) -> str:
    """The index's table rows: each cluster linked to its page, its size and (``by_purity``) its purity."""
    return "".join(
        f'<tr><td><a href="{page_of[c.cluster]}#c{c.cluster}">{c.cluster}</a></td><td>{c.size}</td>'
        + (
            f"<td>{100 * c.purity:.1f}%</td><td>{html.escape(_class_name(c, classes))}</td>"
            if c.purity is not None
            else ("<td></td><td></td>" if by_purity else "")
        )
        + "</tr>"
        for c in shown
    )


def _index_body(
    title: str,
    facts: dict,
    shown: list[ClusterInfo],
    empty: list[int],
    names: list[str],
    classes: list[str] | None,
    *,
    per_page: int,
    by_purity: bool,
) -> str:
    """The index page's HTML body: the facts, the figures, links to every page and the cluster table."""
    rows_html = "".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(v))}</td></tr>" for key, v in facts.items()
    )
    page_of = {c.cluster: names[i // per_page] for i, c in enumerate(shown)}
    cluster_rows = _cluster_rows(shown, page_of, classes, by_purity=by_purity)
    head_cols = "<th>purity</th><th>majority</th>" if by_purity else ""
    parts = [f"<h1>{html.escape(title)}</h1>", f"<table>{rows_html}</table>"]
    if names:
        parts.append(f'<p><a href="{names[0]}" id="next">browse all {len(shown)} clusters &rarr;</a></p>')
    parts += [
        '<h2>Top clusters</h2>\n<img src="top_clusters.png" alt="top clusters">',
        '<h2>Cluster sizes</h2>\n<img src="sizes.png" alt="cluster sizes">',
        "<h2>Pages</h2>",
        "<p>" + " ".join(f'<a href="{n}">{i + 1}</a>' for i, n in enumerate(names)) + "</p>",
        "<h2>Clusters</h2>",
        f"<table><tr><th>cluster</th><th>images</th>{head_cols}</tr>{cluster_rows}</table>",
    ]
    if empty:
        parts.append(f"<p>empty clusters: {', '.join(map(str, empty))}</p>")
    return "\n".join(parts)


def render_report(
    images: ImageSet,
    labels: Tensor,
    n_clusters: list[int],
    out_dir: str | os.PathLike,
    *,
    head: int = 0,
    title: str = "sela clusters",
    info: dict | None = None,
    per_page: int = 10,
    samples: int = 10,
    top: int = 12,
    seed: int = 0,
) -> Path:
    """Write the report of one head's clusters into ``out_dir`` (see the module docstring).

    Args:
        images: the labelled images (in memory or streamed); their targets, if any, give purities.
        labels: (H, N) cluster of each image under each head.
        n_clusters: K per head.
        out_dir: the report folder (created; existing report files are overwritten).
        head: the head whose clusters are shown (``sizes.png`` shows all heads).
        title: the page title; ``info``: key/value pairs shown on the index page.
        per_page: clusters per page; ``samples``: images per cluster; ``top``: rows of top_clusters.png.
        seed: which random members are shown.

    Returns:
        The path of index.html.
    """
    labels = torch.as_tensor(labels).long().cpu()
    _check_arguments(labels, n_clusters, len(images), head=head, per_page=per_page, samples=samples, top=top)
    out = Path(out_dir)
    (out / "clusters").mkdir(parents=True, exist_ok=True)
    k = n_clusters[head]
    table = cluster_table(labels[head], k, images.targets)
    shown = [c for c in table if c.size > 0]
    empty = [c.cluster for c in table if c.size == 0]
    by_purity = any(c.purity is not None for c in table)

    # figures: sizes of every head, the top clusters, one strip per cluster
    atomic_write(out / "sizes.png", lambda tmp: plot_cluster_sizes(labels, list(n_clusters), tmp))
    gen = torch.Generator().manual_seed(seed)
    picks = {c.cluster: _members(labels[head], c.cluster, samples, gen) for c in shown}  # cluster -> rows
    atomic_write(out / "top_clusters.png",
                 lambda tmp: _plot_top_clusters(images, shown[:top], picks, tmp, samples=samples, seed=seed))  # fmt: skip
    for c in shown:
        _save_strip(gather_images(images, picks[c.cluster]), out / "clusters" / f"c{c.cluster:05d}.png")

    _remove_old_pages(out)  # pages of clusters with prev / next links (an earlier report's pages go first)
    names = _write_pages(shown, out, images.classes, title=title, head=head, per_page=per_page)

    # the index
    facts = _facts(info, head=head, k=k, n_empty=len(empty), n_images=len(images), by_purity=by_purity)
    body = _index_body(
        title, facts, shown, empty, names, images.classes, per_page=per_page, by_purity=by_purity
    )
    index = out / "index.html"
    text = _page(title, body)
    atomic_write(index, lambda tmp: tmp.write_text(text))
    return index


# ------------------------------------------------------------------------------------ one folder per cluster

LAYOUT_RECORD = "clusters.json"
SHEET_NAME = "_contact_sheet.jpg"
_LAYOUT_MARK = "sela labels --into"


def _layout_record(out: Path) -> dict | None:
    """The record of an earlier ``sela labels --into`` in ``out``, or None."""
    try:
        record = read_json(out / LAYOUT_RECORD)
    except (ValueError, OSError):
        return None
    return record if record.get("_written_by") == _LAYOUT_MARK else None


def check_layout_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` for :func:`write_cluster_folders`: absent, empty, or sela's earlier layout; else a
    ``ValueError`` that says what to do (checked before any work)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--into {out} is a file; give the name of a folder for the clusters")
    if out.is_dir() and any(out.iterdir()) and _layout_record(out) is None:
        raise ValueError(
            f"--into {out} is not empty and sela did not write it (no {LAYOUT_RECORD}); give a new or empty "
            "folder, so that none of your files are mixed with the clusters"
        )
    return out


def _clear_layout(out: Path) -> None:
    """Remove what an earlier layout wrote into ``out`` (the files its record lists, then the folders
    they leave empty); anything else stays."""
    record = _layout_record(out)
    for name in (record or {}).get("files", []):
        path = out / name
        if path.parent.resolve().is_relative_to(out.resolve()) and (path.is_symlink() or path.is_file()):
            path.unlink()
    for folder in (record or {}).get("folders", []):
        with contextlib.suppress(OSError):
            (out / folder).rmdir()  # only when empty: a file the user put there keeps its folder


def _place(source: str, dest: Path, copy: bool) -> None:
    """A link at ``dest`` to ``source`` (absolute), or a copy of it; renamed into place."""
    if copy:
        atomic_write(dest, lambda tmp: shutil.copyfile(source, tmp))
        return
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.abspath(source), tmp)
        os.replace(tmp, dest)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise RunWriteError(f"could not link {dest} to {source} ({e.strerror or e}); add --copy") from None


def _member_files(
    labels: Tensor, order: Tensor, k: int, *, paths: list[str] | None, width: int
) -> dict[int, list[tuple[int, str]]]:
    """cluster -> [(row, file name in its folder)], the most confident first (``order``: rows sorted)."""
    digits = len(str(max(len(labels) - 1, 0)))
    members: dict[int, list[tuple[int, str]]] = {c: [] for c in range(k)}
    for row in order.tolist():
        base = os.path.basename(paths[row]) if paths is not None else ".png"
        name = f"{row:0{digits}d}_{base}" if paths is not None else f"{row:0{digits}d}.png"
        members[int(labels[row])].append((row, f"{int(labels[row]):0{width}d}/{name}"))
    return members


def _thumbnails(
    rows: list[int], *, paths: list[str] | None, images: ImageSet | None, cell: int
) -> np.ndarray:
    """uint8 (n, s, s, 3) squares of the given images: files decoded by sela's reader at ``cell`` px
    (unreadable ones left out), in-memory images enlarged to at least 64 px (nearest neighbour)."""
    if paths is not None:
        return decode_images([paths[r] for r in rows], (cell, cell), None)[0]
    x = gather_images(images, torch.tensor(rows))  # (n, C, h, w)
    scale = max(1, math.ceil(STRIP_HEIGHT / x.shape[-1]))
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3).expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()  # (n, s, s, 3)


def contact_sheet(thumbs: np.ndarray, path: Path, *, columns: int = 8, pad: int = 2) -> Path:
    """Tile uint8 (n, s, s, 3) thumbnails ``columns`` a row on white, as a JPEG (or PNG) at ``path``."""
    n, s = thumbs.shape[0], thumbs.shape[1]
    cols, rows = min(columns, max(n, 1)), max(1, math.ceil(n / columns))
    sheet = np.full((rows * (s + pad) - pad, cols * (s + pad) - pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        sheet[r * (s + pad) : r * (s + pad) + s, c * (s + pad) : c * (s + pad) + s] = thumbs[i]
    return atomic_write(path, lambda tmp: Image.fromarray(sheet).save(tmp, quality=90))


@dataclass
class Layout:
    """What :func:`write_cluster_folders` wrote: the index page, the cluster folders and how the
    members got there (``"links"``, ``"copies"`` or ``"PNGs"``)."""

    index: Path
    folders: int
    mode: str


def write_cluster_folders(
    out_dir: str | os.PathLike,
    labels: Tensor,
    n_clusters: int,
    *,
    confidence: Tensor,
    paths: list[str] | None = None,
    images: ImageSet | None = None,
    copy: bool = False,
    title: str = "sela clusters",
    info: dict | None = None,
    per_sheet: int = 64,
    cell: int = 96,
) -> Layout:
    """Lay N images out as one folder per cluster in ``out_dir`` (see the module docstring).

    Args:
        out_dir: absent, empty, or an earlier layout (replaced: the files it lists are removed first).
        labels: (N,) cluster of each image, 0..K-1; ``n_clusters``: K.
        confidence: (N,) confidence of each label (0..1): the members and sheets go most confident first.
        paths: the N images' files (linked, or copied with ``copy``); None: ``images`` (in memory or
            streamed without files) are written as PNGs.
        title, info: the index page's title and key/value facts.
        per_sheet: images on each contact sheet; ``cell``: their side in px (files; in-memory images are
            enlarged to at least 64 px).
    """
    labels = torch.as_tensor(labels).long().cpu()
    confidence = torch.as_tensor(confidence).float().cpu()
    if labels.ndim != 1 or confidence.shape != labels.shape or (paths is None and images is None):
        raise ValueError("need (N,) labels and confidences, and the N images' paths or pixels")
    out = check_layout_dir(out_dir)
    width = max(3, len(str(n_clusters - 1)))
    order = torch.argsort(confidence, descending=True, stable=True)  # (N,) rows, most confident first
    members = _member_files(labels, order, n_clusters, paths=paths, width=width)
    filled = [c for c in range(n_clusters) if members[c]]
    folders = [f"{c:0{width}d}" for c in filled]
    mode = "PNGs" if paths is None else "copies" if copy else "links"
    _start_layout(
        out, members, folders, info={**(info or {}), "k": n_clusters, "images": len(labels), "mode": mode}
    )
    tops = {}  # cluster -> its 8 most confident thumbnails, for top_clusters.png
    for c, folder in zip(tqdm(filled, desc="clusters", unit="cluster", disable=None), folders, strict=True):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for row, name in members[c]:
            if paths is None:
                _save_image(gather_images(images, torch.tensor([row]))[0], out / name)
            else:
                _place(paths[row], out / name, copy)
        thumbs = _thumbnails(
            [row for row, _ in members[c][:per_sheet]], paths=paths, images=images, cell=cell
        )
        if len(thumbs):
            contact_sheet(thumbs, out / folder / SHEET_NAME)
            tops[c] = thumbs[:8]
    index = _layout_index(
        out, members, tops, confidence, labels, title=title, info=info, width=width, mode=mode
    )
    return Layout(index, len(folders), mode)


def _start_layout(out: Path, members: dict[int, list], folders: list[str], *, info: dict) -> None:
    """Remove an earlier layout from ``out``, then record the one about to be written (first: an
    interrupted layout is still sela's to replace)."""
    files = [name for c in sorted(members) for _, name in members[c]] + [f"{f}/{SHEET_NAME}" for f in folders]
    _clear_layout(out)
    sizes = {f: len(members[int(f)]) for f in folders}
    record = {"_written_by": _LAYOUT_MARK, "_version": sela.__version__, **info, "sizes": sizes,
              "folders": folders, "files": files}  # fmt: skip
    write_json(out / LAYOUT_RECORD, record)


def _save_image(image: Tensor, path: Path) -> None:
    """uint8 (C, H, W) as a PNG."""
    array = image.permute(1, 2, 0).numpy()  # (H, W, C)
    atomic_write(path, Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save)


def _layout_index(
    out: Path, members: dict[int, list], tops: dict[int, np.ndarray], confidence: Tensor, labels: Tensor,
    *, title: str, info: dict | None, width: int, mode: str,
) -> Path:  # fmt: skip
    """``top_clusters.png`` (8 most confident members of each of the 12 largest clusters) and
    ``index.html`` (facts, that figure, one row per cluster with its contact sheet)."""
    largest = sorted(tops, key=lambda c: (-len(members[c]), c))[:12]
    cells = [torch.from_numpy(tops[c]) for c in largest]  # each (<= 8, s, s, 3)
    picked = torch.cat(cells).permute(0, 3, 1, 2) if cells else None  # (n, 3, s, s)
    owner = torch.repeat_interleave(torch.tensor(largest), torch.tensor([len(t) for t in cells]))  # (n,)
    names = [f"{c:0{width}d} ({len(members[c])})" for c in largest]
    if largest:  # (with index.html the reader's mark of sela's output)
        atomic_write(out / "top_clusters.png",
                     lambda tmp: cluster_grid(picked, owner, largest, tmp, per_cluster=8, titles=names))  # fmt: skip
    k = len(members)
    facts = {**(info or {}), "clusters": k, "images": len(labels), "members": mode}
    rows = []
    for c in sorted(members, key=lambda c: (-len(members[c]), c)):
        folder = f"{c:0{width}d}"
        mean = float(confidence[labels == c].mean()) if members[c] else float("nan")
        sheet = f'<a href="{folder}/"><img src="{folder}/{SHEET_NAME}" width="260" alt="cluster {c}"></a>'
        name = f'<a href="{folder}/">{folder}</a>' if members[c] else f"{folder} (empty)"
        rows.append(f"<tr><td>{name}</td><td>{len(members[c])}</td><td>{mean:.3f}</td>"
                    f"<td>{sheet if c in tops else ''}</td></tr>")  # fmt: skip
    facts_html = "".join(
        f"<tr><th>{html.escape(str(a))}</th><td>{html.escape(str(b))}</td></tr>" for a, b in facts.items()
    )
    body = (
        f"<h1>{html.escape(title)}</h1>\n<table>{facts_html}</table>\n"
        '<h2>Largest clusters</h2>\n<img src="top_clusters.png" alt="largest clusters">\n<h2>Clusters</h2>\n'
        f"<table><tr><th>folder</th><th>images</th><th>mean confidence</th><th>most confident</th></tr>{''.join(rows)}</table>"
    )
    index = out / "index.html"
    text = _page(title, body)
    return atomic_write(index, lambda tmp: tmp.write_text(text))
