"""The package's layering: every import of every module, function-level ones included, points down.

Each module of ``src/sela`` has a rank (below); a module may import modules of its own rank or lower,
never higher. The ranks follow the package's shape: the solver, models, data and torch.distributed
helpers at the bottom; the label layer, schedules, objectives, evaluation and the run directory in the
middle; the training loop above them; the inspection commands (runs, export, report) and the
configuration above the loop; the CLI on top.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sela"

RANKS = {
    "sela.sinkhorn": 0,
    "sela.models": 0,
    "sela.data": 0,
    "sela.data.registry": 0,
    "sela.data.reader": 0,
    "sela.data.cache": 0,
    "sela.distributed": 0,
    "sela.plots": 0,
    "sela.eval": 1,
    "sela.labeller": 2,
    "sela.clusters": 2,  # OT k-means, the K scan and the balance line (sela labels --k)
    "sela.schedule": 2,
    "sela.rundir": 2,
    "sela.objectives": 3,
    "sela.plan": 3,
    "sela.sinks": 3,
    "sela.loggers": 3,  # the metric loggers (TensorBoard, MLflow) on the sink interface
    "sela.labelpass": 3,
    "sela.train": 4,
    "sela.finish": 4,
    "sela.config": 2,  # the schema: imports no sela module (and no torch)
    "sela.recipes": 5,
    "sela.runs": 5,
    "sela.weights": 5,  # --init sources: run directories, exports, state dicts, library weights names
    "sela.build": 6,
    "sela.sizing": 6,  # budget-aware sizing: times the recipe's training steps (sela.build's builders)
    "sela.export": 6,
    "sela.report": 6,
    "sela.cli": 7,
    "sela.__main__": 7,
    "sela": 7,  # the package's lazy top-level names
}


def module_name(path: Path, root: Path = SRC) -> str:
    parts = ["sela", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rank_of(module: str) -> int:
    """The rank of a sela module: its own entry, else its package's (sela.models.convnet -> sela.models)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANKS:
            return RANKS[".".join(parts[:n])]
    raise KeyError(f"{module} has no rank in tests/test_layers.py; give it one")


def sela_imports(source: str, module: str) -> list[tuple[int, str]]:
    """(line, imported sela module) for every import statement in ``source``, at any depth."""
    found = []
    package = module if module.count(".") == 0 else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "sela"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
            if base.split(".")[0] == "sela":
                names = [f"{base}.{a.name}" if base == "sela" else base for a in node.names]
                found += [(node.lineno, n) for n in names]
    return found


def upward_imports(root: Path = SRC) -> list[str]:
    """'module:line imports X (rank a -> b)' for every import that points up."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        for line, target in sela_imports(path.read_text(), module):
            if target == "sela.__version__" or target == "sela":
                continue  # the version string
            if rank_of(target) > rank_of(module):
                bad.append(f"{module}:{line} imports {target} (rank {rank_of(module)} -> {rank_of(target)})")
    return bad


def test_every_module_has_a_rank():
    for path in SRC.rglob("*.py"):
        rank_of(module_name(path))


def test_no_module_imports_upwards():
    assert upward_imports() == []


def test_training_does_not_import_the_inspection_stack():
    assert RANKS["sela.train"] < min(RANKS[m] for m in ("sela.runs", "sela.export", "sela.report"))


def test_the_loops_parts_sit_below_the_loop():
    """The plan, the label pass and the sinks are the loop's parts: none of them may import the loop."""
    assert max(RANKS[m] for m in ("sela.plan", "sela.labelpass", "sela.sinks")) < RANKS["sela.train"]
    assert RANKS["sela.schedule"] <= RANKS["sela.plan"] and RANKS["sela.labeller"] <= RANKS["sela.labelpass"]


@pytest.mark.parametrize("where", ["top", "function"])
def test_an_upward_import_is_caught(tmp_path, where):
    """A copy of the package with one upward import added (at the top, or lazily inside a function)."""
    import shutil

    root = tmp_path / "sela"
    shutil.copytree(SRC, root)
    target = root / "sinkhorn.py"
    line = "from sela.train import Trainer\n"
    text = target.read_text()
    text = (
        line + text
        if where == "top"
        else text + f"\n\ndef _lazy():\n    {line.strip()}\n    return Trainer\n"
    )
    target.write_text(text)
    assert [b for b in upward_imports(root) if b.startswith("sela.sinkhorn:")]
