"""The house keeps its rules, and docs/architecture.md stays true.

One import name, `skinclr`; wings in a fixed order, each importing only the wings below it;
Ray in `tune` alone; no import loop; no module over 300 lines; tests that mirror the package."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
# Lowest first: a module may import its own wing and the wings before it, never one after it.
WINGS = ("base", "data", "track", "train", "serve", "run", "report", "tune", "cli")
FOLDERS = {"skinclr": REPO / "core", "skinclr.tune": REPO / "experiments" / "tune",
           "skinclr.cli": REPO / "experiments" / "cli"}
MAX_LINES = 300


def modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    out = {}
    for prefix, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            if "__pycache__" in path.parts or (prefix == "skinclr" and path.parts[len(folder.parts)] in
                                                ("tune", "cli")):
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([prefix, *parts])] = path
    return out


def wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in WINGS) else "base"


def imports(path: Path) -> set[str]:
    """Every module named by an import anywhere in the file (lazy imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def own_imports(path: Path, known: dict[str, Path]) -> set[str]:
    return {m for m in imports(path) if m in known}


def test_one_import_name_from_another_folder(tmp_path):
    """Installed code is importable as `skinclr` only; `core`, `experiments`, `search_spaces` are not."""
    code = ("import importlib.util, skinclr, skinclr.cli.main, skinclr.configs, skinclr.search_spaces; "
            "print([n for n in ('core', 'experiments', 'search_spaces') if importlib.util.find_spec(n)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_doc_lists_every_module_and_only_modules_that_exist():
    listed = set(re.findall(r"`((?:core|experiments/tune|experiments/cli)/[\w/]+\.py)`", DOC.read_text()))
    actual = {str(p.relative_to(REPO)) for p in modules().values() if p.name != "__init__.py"}
    actual |= {str(p.relative_to(REPO)) for name, p in modules().items()
               if p.name == "__init__.py" and p.read_text().count("\n") > 3}  # a package that holds code
    assert not listed - actual, f"docs/architecture.md lists modules that do not exist: {sorted(listed - actual)}"
    assert not actual - listed, f"modules missing from docs/architecture.md: {sorted(actual - listed)}"


def test_every_wing_says_what_it_is_for():
    for name, path in modules().items():
        if path.name == "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text()))
            assert doc, f"{path.relative_to(REPO)}: a wing's __init__ says its purpose in a docstring"


def test_no_wing_imports_a_wing_above_it():
    known = modules()
    upward = {}
    for name, path in known.items():
        if name == "skinclr":
            continue  # the package root is no wing; what it may load is checked below
        rank = WINGS.index(wing(name))
        bad = sorted(m for m in own_imports(path, known) if WINGS.index(wing(m)) > rank)
        if bad:
            upward[name] = bad
    assert not upward, f"imports of a higher wing: {upward}"


def test_the_package_root_loads_the_method_registry_and_nothing_heavy(tmp_path):
    """`import skinclr` loads the (torch-free) method registry, so every Config has every method's section."""
    assert own_imports(FOLDERS["skinclr"] / "__init__.py", modules()) == {"skinclr.train.methods"}
    code = "import sys, skinclr; print(sorted(m for m in ('torch', 'mlflow', 'ray', 'albumentations') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_ray_is_imported_in_tune_alone():
    users = sorted(name for name, path in modules().items()
                   if wing(name) != "tune" and any(m.split(".")[0] == "ray" for m in imports(path)))
    assert not users, f"modules outside skinclr.tune import Ray: {users}"


def test_no_import_loop():
    known = modules()
    graph = {name: {m for m in own_imports(path, known) if m != name and not name.startswith(m + ".")}
             for name, path in known.items()}
    # a package's __init__ importing its own submodules is how a package is built, not a loop
    graph = {n: {m for m in deps if not m.startswith(n + ".")} for n, deps in graph.items()}
    done, stack, loops = set(), [], []

    def visit(node):
        if node in stack:
            loops.append(stack[stack.index(node):] + [node])
            return
        if node in done:
            return
        stack.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert not loops, f"import loops: {loops[:3]}"


def test_no_module_over_300_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (one concept a module): {long}"


PROJECT_TESTS = {"test_architecture", "test_readme", "test_docker_configs"}  # the project as a whole


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "tests").rglob("test_*.py")
                                        if "benchmarks" not in p.parts and "studies" not in p.parts),
                         ids=lambda p: str(p.relative_to(REPO / "tests")))
def test_tests_mirror_the_package(path):
    """tests/<wing>/test_<module>[_<part>].py: a test file names the module it tests, in its wing."""
    if path.stem in PROJECT_TESTS:
        return
    folder = path.parent.relative_to(REPO / "tests").parts
    package = ".".join(["skinclr", *folder])
    names = {n.rsplit(".", 1)[-1] for n in modules() if n.rsplit(".", 1)[0] == package}
    names |= {package.rsplit(".", 1)[-1]} if folder else set()
    stem = path.stem[len("test_"):]
    assert any(stem == n or stem.startswith(n + "_") for n in names), \
        f"{path.relative_to(REPO)} names no module of {package} ({sorted(names)})"


def test_a_plain_install_ships_one_package_with_its_configs(tmp_path):
    """`pip install .` (as a wheel): everything under `skinclr/`, the shipped configs and search
    spaces as package data, nothing installed as `core`, `experiments` or `search_spaces`."""
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("skinclr-*.whl")
    files = zipfile.ZipFile(wheel).namelist()
    tops = {f.split("/")[0] for f in files if not f.split("/")[0].endswith(".dist-info")}
    assert tops == {"skinclr"}
    shipped = {f.removeprefix("skinclr/") for f in files}
    for path in (REPO / "experiments").rglob("*.yaml"):
        assert f"configs/{path.relative_to(REPO / 'experiments')}" in shipped, path
    assert {f"search_spaces/{p.name}" for p in (REPO / "search_spaces").glob("*.yaml")} <= shipped
    assert {"cli/main.py", "tune/sweep.py", "train/engine.py", "data/manifest.py"} <= shipped
