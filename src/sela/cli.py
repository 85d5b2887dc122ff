"""The ``sela`` command: argparse subcommands that parse, call :mod:`sela.build` or a command, and print.

The only module that reads argv. Bad input is one line ``sela: error: ...`` (exit code 2), never a
traceback. Nothing heavy is imported until a command runs: ``sela --help``, ``sela --version`` and
``sela <command> --help`` load neither torch nor matplotlib (the train flags come from :mod:`sela.config`,
which imports no torch).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import warnings
from pathlib import Path

import sela
from sela.config import BY_KEY, OPTIONS
from sela.recipes import RECIPES

# defaults of the inspection commands' flags, written here so that --help needs no torch; each is the
# default of the component named beside it (tests/test_cli.py checks them)
INSPECT_DEFAULTS = {
    "batch_size": (256, "sela.eval.features:extract.batch_size"),
    "per_page": (10, "sela.report:render_report.per_page"),
    "samples": (10, "sela.report:render_report.samples"),
    "top": (12, "sela.report:render_report.top"),
    "cluster_epochs": (200, "sela.labeller:SelfLabeller.epochs"),
    "relax": (1.0, "sela.clusters:DEFAULT_RELAX"),
}
KNN_K, KNN_T = BY_KEY["eval.knn_k"].default, BY_KEY["eval.knn_temperature"].default
LAM, WORKERS = BY_KEY["labels.lam"].default, BY_KEY["runtime.workers"].default


class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit code 2."""


_say = functools.partial(print, flush=True)


# --------------------------------------------------------------------------------------------------------
# sela train: its flags are the schema's


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a network by self-labelling",
        description="Train by self-labelling (SeLa). Defaults < recipe < --config TOML < flags < --set "
        "overrides. Every setting: docs/training.md.",
    )
    for o in (o for o in OPTIONS if o.flag):
        help = o.help_line() + (f" (recipes: {', '.join(RECIPES)})" if o.key == "recipe" else "")
        if o.flag_value is not None:
            p.add_argument(o.flag, dest=o.key, action="store_const", const=o.flag_value, help=help)
        else:
            p.add_argument(o.flag, dest=o.key, metavar="VALUE", help=help)
    p.add_argument("--config", help="TOML file of settings (keys and tables as in config.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of any setting, e.g. --set augment.grayscale_p=0.1 (repeatable)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--force", action="store_true", help="train into a non-empty --out that is not a sela run")
    p.set_defaults(func=cmd_train)


def train_flags(args: argparse.Namespace) -> dict:
    """The schema settings given as flags: {dotted key: value}."""
    return {o.key: getattr(args, o.key) for o in OPTIONS if o.flag and getattr(args, o.key) is not None}


def cmd_train(args: argparse.Namespace) -> int:
    """parse -> sela.build.train (which reports the run and its summary)."""
    from sela.build import TRAIN_FAILURES, train

    try:
        train(train_flags(args), toml=args.config, overrides=args.set, resume=args.resume, force=args.force,
              log=_say)  # fmt: skip
    except TRAIN_FAILURES as e:
        print(f"sela: error: {e}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------------------
# small commands


def _add_lists(sub: argparse._SubParsersAction) -> None:
    def models(args) -> int:
        from sela.models import list_models

        print("\n".join([*list_models(), "timm:<name>  (any timm model: pip install 'sela[timm]')"]))
        return 0

    def datasets(args) -> int:
        from sela.data import dataset_info, list_datasets

        for name in list_datasets():
            info = dataset_info(name)
            side = f"{info.default_image_size} px" if info.default_image_size else "native side"
            print(f"{name:<10} splits {', '.join(info.splits)}; {side}")
        return 0

    sub.add_parser("models", help="list the registered architectures").set_defaults(func=models)
    sub.add_parser("datasets", help="list the registered datasets").set_defaults(func=datasets)


# --------------------------------------------------------------------------------------------------------
# inspecting runs: sela eval, sela labels, sela show, sela cluster


def _add_source_flags(p: argparse.ArgumentParser) -> None:
    """The model and data flags of a run or checkpoint (a sela run records them; others need them)."""
    p.add_argument("--dataset", help="dataset (default: the run's); needed for non-sela checkpoints")
    p.add_argument("--data-dir", help="where the dataset lives (default: the run's)")
    p.add_argument("--image-size", type=int, help="px the model sees (default: the run's)")
    p.add_argument("--arch", help="architecture of a non-sela checkpoint: see `sela models`")
    p.add_argument("--clusters", help="K per head (comma list) for a checkpoint without heads")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    batch = INSPECT_DEFAULTS["batch_size"][0]
    p.add_argument("--batch-size", type=int, default=batch, help=f"images per forward pass ({batch})")
    p.add_argument(
        "--workers", type=int, default=WORKERS, help=f"DataLoader workers, streamed data ({WORKERS})"
    )


def _device(name: str):
    from sela.build import resolve_device

    return resolve_device(name)


def _open_run(args: argparse.Namespace, **splits: bool):
    from sela.runs import load_run

    clusters = None
    if args.clusters:
        try:
            clusters = [int(k) for k in args.clusters.split(",")]
        except ValueError:
            raise UsageError(f"--clusters takes integers like 30 or 10,20, not {args.clusters!r}") from None
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError(f"need --batch-size >= 1 and --workers >= 0; got {args.batch_size}, {args.workers}")
    run = load_run(
        args.source, dataset=args.dataset, data_dir=args.data_dir, image_size=args.image_size,
        arch=args.arch, clusters=clusters, device=_device(args.device), **splits,
    )  # fmt: skip
    for note in run.notes:
        print(f"sela: note: {note}", file=sys.stderr)
    return run


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a run or checkpoint: kNN, linear probe and cluster scores of every head",
        description="Evaluate a sela run directory, a sela checkpoint, torchvision ResNet weights or a "
        "released SeLa checkpoint: weighted kNN, a linear probe on frozen features, and NMI/AMI/ARI/"
        "accuracy of every head on train and test and of the stored self-labels. Writes eval.json.",
    )
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT")
    _add_source_flags(p)
    p.add_argument("--head", type=int, help="report this head (default: the best NMI on the training split)")
    p.add_argument("--layer", help="features from this layer (e.g. block2, layer3; default: pooled output)")
    p.add_argument("--knn-k", type=int, default=KNN_K, help=f"neighbours of the kNN classifier ({KNN_K})")
    p.add_argument("--knn-t", type=float, default=KNN_T, help=f"temperature of the kNN votes ({KNN_T})")
    p.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    p.add_argument("-o", "--output", help="eval.json path (default: RUN_DIR/eval.json, else ./eval.json)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from sela.eval.evaluate import evaluate, format_report
    from sela.rundir import write_json

    if args.knn_k < 1 or args.knn_t <= 0:
        raise UsageError(f"--knn-k must be >= 1 and --knn-t > 0, got {args.knn_k} and {args.knn_t}")
    run = _open_run(args)
    if args.layer and args.layer not in run.model.feature_layers:
        raise UsageError(
            f"--layer {args.layer!r} is not a layer of {run.arch}; choose {run.model.feature_layers}"
        )
    result = evaluate(
        run.model, run.train_set, run.test_set, transform=run.transform, labels=run.labels,
        untrained_heads=run.untrained_heads, head=args.head, layer=args.layer, knn_k=args.knn_k,
        knn_temperature=args.knn_t, linear=not args.no_linear, device=run.device, batch_size=args.batch_size,
        workers=args.workers,
    )  # fmt: skip
    out = Path(args.output) if args.output else (run.run_dir or Path(".")) / "eval.json"
    record = {"source": str(args.source), "arch": run.arch, "dataset": run.dataset, "image_size": run.image_size,
              **result, "_command": sys.argv, "_version": sela.__version__}  # fmt: skip
    write_json(out, record)
    n_test = len(run.test_set) if run.test_set is not None else 0
    print(
        f"{run.arch} on {run.dataset}: {len(run.train_set)} train / {n_test} test images, {run.image_size} px"
    )
    print(format_report(result))
    print(f"wrote {out}")
    return 0


def _add_labels(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "labels",
        help="export a run's clusters (its heads' own, or N groups with --k), lay them out as folders",
        description="Write a labels CSV (path or index, a label and a confidence column per head) and size histograms "
        "of the run's self-labels, of new images (--images), or of N groups of the features (--k). docs/export.md",
    )
    p.add_argument("source", metavar="RUN_DIR")
    p.add_argument("-o", "--output", help="CSV path (./labels.csv); with --k-scan the plot (./k_scan.png)")
    p.add_argument("--images", metavar="PATH", help="a folder of images or a text file with one path a line")
    p.add_argument("--balanced", action="store_true", help="with --images: equal-sized clusters (Sinkhorn)")
    p.add_argument("--lam", type=float, default=LAM, help=f"lambda of the balanced assignment ({LAM:g})")
    p.add_argument("--k", type=int, metavar="N", help="cluster the features into N groups (OT k-means)")
    p.add_argument("--k-scan", metavar="KS", help="score K without labels, pick one: 2,5,10 / 2-20 / 5-50:5")
    p.add_argument("--marginal", choices=("uniform", "relaxed"), help="--k's sizes: equal (default) or free")
    relax = INSPECT_DEFAULTS["relax"][0]
    p.add_argument("--relax", type=float, metavar="RHO", help=f"relaxed marginal's size penalty ({relax:g})")
    p.add_argument("--seed", type=int, default=0, help="seed of --k and --k-scan (0)")
    p.add_argument("--into", metavar="DIR", help="also lay the images out as DIR/<cluster>/, contact sheets")
    p.add_argument("--copy", action="store_true", help="with --into: copy the files instead of linking them")
    p.add_argument("--head", type=int, help="with --into: the head to lay out (default: the run's best)")
    _add_source_flags(p)
    p.set_defaults(func=cmd_labels)


def cmd_labels(args: argparse.Namespace) -> int:
    from sela.export import check_labels_request, export_labels, scan_run, write_layout

    ks, args.relax = check_labels_request(k=args.k, k_scan=args.k_scan, balanced=args.balanced, images=args.images,
        into=args.into, copy=args.copy, head=args.head, marginal=args.marginal, relax=args.relax)  # fmt: skip
    run = _open_run(args, test_split=False, train_split=not args.images)
    kw = {key: getattr(args, key) for key in ("images", "relax", "seed", "batch_size", "workers")}
    out = args.output or ("k_scan.png" if ks else "labels.csv")
    if ks:
        lines = scan_run(run, ks, out, **kw)
    else:
        found = export_labels(run, out, balanced=args.balanced, lam=args.lam, k=args.k, **kw)
        layout = [write_layout(found, args.into, head=args.head, copy=args.copy)] if args.into else []
        lines = found.report() + layout
    print("\n".join(lines))
    return 0


def _add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show",
        help="render a run's clusters as PNG grids and a static HTML report",
        description="Render sample images of every cluster of a head (sorted by purity with ground truth, "
        "by size otherwise), cluster-size histograms and index.html with pages of clusters.",
    )
    p.add_argument("source", metavar="RUN_DIR")
    p.add_argument("-o", "--output", help="report folder (default RUN_DIR/report)")
    p.add_argument("--head", type=int, help="head to show (default: the run's best head, else 0)")
    for flag, what in (("per_page", "clusters per page"), ("samples", "images per cluster"),
                       ("top", "clusters in top_clusters.png")):  # fmt: skip
        value = INSPECT_DEFAULTS[flag][0]
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, default=value, help=f"{what} ({value})")
    _add_source_flags(p)
    p.set_defaults(func=cmd_show)


def cmd_show(args: argparse.Namespace) -> int:
    from sela.report import render_report

    run = _open_run(args, test_split=False)
    if run.labels is None:
        raise UsageError(
            f"{args.source} holds no self-labels of these training images to show; "
            "pass the run directory of `sela train` with its own data"
        )
    head = args.head if args.head is not None else int(run.summary.get("best_head", 0))
    out = Path(args.output) if args.output else (run.run_dir or Path(".")) / "report"
    index = render_report(
        run.train_set, run.labels, list(run.model.n_clusters), out, head=head,
        title=f"sela: {run.arch} on {run.dataset}", info={"source": str(args.source)}, per_page=args.per_page,
        samples=args.samples, top=args.top,
    )  # fmt: skip
    pages = len(list(out.glob("page_*.html")))
    print(f"wrote {index} ({pages} page(s) of head {head}'s clusters, sizes.png, top_clusters.png)")
    return 0


def _add_cluster(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cluster",
        help="self-label your own embedding (.npy / .pt, N x D) into balanced clusters",
        description="Balanced self-labelling (SeLa) of fixed features with SelfLabeller: linear heads "
        "trained against Sinkhorn labels. Writes a labels CSV (index, head columns, confidences).",
    )
    p.add_argument("features", metavar="FEATURES", help="an (N, D) array saved with np.save or torch.save")
    p.add_argument("--k", type=int, default=10, help="clusters per head (10)")
    p.add_argument("--heads", type=int, default=1, help="number of heads (1)")
    p.add_argument("--lam", type=float, default=LAM, help=f"lambda of the label step ({LAM:g})")
    epochs = INSPECT_DEFAULTS["cluster_epochs"][0]
    p.add_argument("--epochs", type=int, default=epochs,
                   help=f"passes over the features ({epochs}; 40 gave NMI 0.70 vs 0.76 on digits)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto or cuda")
    p.add_argument("-o", "--output", default="labels.csv", help="CSV path (default ./labels.csv)")
    p.set_defaults(func=cmd_cluster)


def cmd_cluster(args: argparse.Namespace) -> int:
    import time

    from sela.clusters import balance_lines
    from sela.export import cluster_features, load_features, write_labels_csv

    if args.k < 2 or args.heads < 1 or args.epochs < 1 or not (math.isfinite(args.lam) and args.lam > 0):
        raise UsageError("need --k >= 2, --heads >= 1, --epochs >= 1 and --lam > 0")
    device = _device(args.device)
    x = load_features(args.features)  # (N, D)
    start = time.perf_counter()
    labels, conf, best = cluster_features(x, n_clusters=args.k, n_heads=args.heads, lam=args.lam,
                                          epochs=args.epochs, seed=args.seed, device=device)  # fmt: skip
    path = write_labels_csv(args.output, labels, confidence=conf)
    took = time.perf_counter() - start
    print(f"clustered {x.shape[0]} x {x.shape[1]} features into {args.heads} x {args.k} clusters in {took:.1f} s; "
          f"best head {best}", *balance_lines(labels, [args.k] * args.heads, confidence=conf), sep="\n")  # fmt: skip
    print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------------------------------------
# using a trained network without sela: sela embed, sela export


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="write the features of images (a folder or a file list) from a run's backbone",
        description="Run images through a trained backbone and write their (N, D) features with the image "
        "paths; -o's suffix picks the format: .npy (paths in <stem>.paths.txt next to it), .pt "
        '({"features", "paths"}, torch.load(weights_only=True)) or .csv (path, f0 .. f{D-1}). Images are '
        "fitted to the run's input size and normalised as in training.",
    )
    p.add_argument("source", metavar="RUN_DIR")
    p.add_argument("images", metavar="IMAGES", help="a folder of images or a text file with one path a line")
    p.add_argument("-o", "--output", required=True, help="features file: .npy, .pt or .csv")
    p.add_argument("--layer", help="features from this layer (e.g. block2, layer3; default: pooled output)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_source_flags(p)
    p.set_defaults(func=cmd_embed)


def cmd_embed(args: argparse.Namespace) -> int:
    from sela.export import check_embedding_path, embed_images, list_images, write_embedding

    if not Path(args.images).exists():
        raise UsageError(f"{args.images} does not exist; pass a folder of images or a text file of paths")
    check_embedding_path(args.output, list_images(args.images))  # before the run is opened
    run = _open_run(args, test_split=False, train_split=False)
    features, paths = embed_images(run, args.images, layer=args.layer, batch_size=args.batch_size,
                                   progress=False if args.no_progress else None)  # fmt: skip
    written = write_embedding(args.output, features, paths)
    also = f" (image paths in {written[1]})" if len(written) > 1 else ""
    print(f"wrote {written[0]}: {features.shape[0]} images x {features.shape[1]} features{also}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's backbone for use without sela (torchvision keys for the ResNets, or ONNX)",
        description="Write the trained backbone (no heads, no projector). -o *.pt: a state dict, for the ResNets "
        "with torchvision's keys (loads with strict=True into torchvision.models.resnet18() etc. with fc = "
        'nn.Identity()), else {"spec", "state_dict"} (sela.models.load_exported); -o *.onnx: an ONNX graph, '
        "normalised images in, features out, dynamic batch. A JSON file next to it says how to preprocess and load.",
    )
    p.add_argument("source", metavar="RUN_DIR")
    p.add_argument("-o", "--output", required=True, help="weights file: .pt, .pth or .onnx")
    _add_source_flags(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from sela.export import LAYOUTS, WEIGHT_FORMATS, export_backbone

    out = Path(args.output)
    if out.is_dir() or out.suffix.lower() not in WEIGHT_FORMATS:
        raise UsageError(f"-o {out}: give a file name ending in .pt, .pth or .onnx, like weights.pt")
    run = _open_run(args, test_split=False, train_split=False)
    weights, info = export_backbone(run, out, extra={"_command": sys.argv, "_version": sela.__version__})
    layout = LAYOUTS[json.loads(info.read_text())["layout"]]
    print(f"wrote {weights}: {run.arch} backbone, D = {run.model.feature_dim}, {layout}; how to load: {info}")
    return 0


# --------------------------------------------------------------------------------------------------------
# entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sela", description="Self-labelling via simultaneous clustering and representation learning."
    )
    parser.add_argument("--version", action="version", version=f"sela {sela.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    adders = (_add_train, _add_lists, _add_eval, _add_labels, _add_show, _add_cluster, _add_embed)
    for add in (*adders, _add_export):
        add(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, like errors (no source line)."""
    print(f"sela: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # a warning about the user's data is said every time
            return _run(argv)
    finally:
        warnings.showwarning = shown


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    for key in {"source", "data_dir", "output", "images", "features", "config"} & set(vars(args)):  # ~/x
        setattr(args, key, getattr(args, key) and os.path.expanduser(getattr(args, key)))
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"sela: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # sela's writes are atomic (a RunWriteError), so mostly a read: it says which
        from sela.rundir import describe_os_error

        print(f"sela: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sela: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
