"""docs/architecture.md stays true: it lists every module of the two layers, each one that exists,
and the layers keep their direction (core never imports Ray or the sweep layer)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
PACKAGES = ("core", "experiments")


def listed_modules() -> set[str]:
    """Module paths named in the doc's tables (`core/data.py`, `experiments/sweep.py` ...)."""
    return set(re.findall(r"`((?:core|experiments)/[\w/]+\.py)`", DOC.read_text()))


def package_modules() -> set[str]:
    return {str(p.relative_to(REPO)) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
            if p.name != "__init__.py" and "__pycache__" not in p.parts}


def test_every_module_the_doc_lists_exists():
    missing = sorted(m for m in listed_modules() if not (REPO / m).is_file())
    assert not missing, f"docs/architecture.md lists modules that do not exist: {missing}"


def test_the_doc_lists_every_module():
    unlisted = sorted(package_modules() - listed_modules())
    assert not unlisted, f"modules missing from docs/architecture.md: {unlisted}"


def imported_top_levels(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_never_imports_ray_or_the_sweep_layer():
    upward = {str(p.relative_to(REPO)): sorted(imported_top_levels(p) & {"ray", "experiments"})
              for p in (REPO / "core").rglob("*.py")}
    assert not {m: names for m, names in upward.items() if names}
