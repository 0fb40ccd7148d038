"""The package's import structure: no import cycles, no torch behind saved results, one list of scorers,
and tests that stay out of the user's nsds cache (tests/conftest.py)."""

import ast
import itertools
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

import nsds
from nsds import assets
from nsds.errors import NsdsError
from nsds.files import cache_dir

import needs

SRC = Path(nsds.__file__).resolve().parent  # src/nsds


def module_name(path: Path, src: Path = SRC) -> str:
    """The dotted name of a file under `src` (src/nsds); a package's __init__.py is the package itself."""
    parts = path.relative_to(src.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def nsds_modules(src: Path = SRC) -> dict[str, Path]:
    return {module_name(path, src): path for path in sorted(src.rglob("*.py"))}


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The nsds module `name` names, else its closest nsds ancestor (an unknown submodule), else None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_edges(modules: dict[str, Path]) -> dict[str, dict[str, list[int]]]:
    """module -> {imported nsds module: [line numbers]} for EVERY import statement, at module level or inside
    functions, methods, `if TYPE_CHECKING:` and try blocks alike. `from pkg import name` goes to pkg.name when
    that is a module file, else to pkg; relative imports are resolved; the implicit import of parent packages
    is not counted."""
    edges: dict[str, dict[str, list[int]]] = {name: {} for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_target(alias.name, modules) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")
                    if node.level - 1 >= len(base_parts):
                        raise AssertionError(f"{path}:{node.lineno}: relative import beyond the top package")
                    base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in modules else _target(base, modules))
            for target in targets:
                if target is not None:
                    edges[name].setdefault(target, []).append(node.lineno)
    return edges


def shortest_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """The shortest directed cycle (as [a, b, ..., a]), by a BFS from every node back to itself."""
    best: list[str] | None = None
    for start in sorted(graph):
        parent: dict[str, str | None] = {start: None}
        queue = deque([start])
        found: str | None = None
        while queue and found is None:
            node = queue.popleft()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    found = node
                    break
                if nxt not in parent:
                    parent[nxt] = node
                    queue.append(nxt)
        if found is None:
            continue
        path = [found]
        while parent[path[-1]] is not None:
            path.append(parent[path[-1]])  # type: ignore[arg-type]
        cycle = [*reversed(path), start]
        if best is None or len(cycle) < len(best):
            best = cycle
    return best


def test_import_graph_helpers_see_every_kind_of_import(tmp_path):
    """The graph builder itself: function-level, relative and `from pkg import module` imports all count."""
    src = tmp_path / "nsds"
    (src / "sub").mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "a.py").write_text("def f():\n    from nsds.sub import b\n")
    (src / "sub" / "__init__.py").write_text("from .c import X\n")
    (src / "sub" / "b.py").write_text("import os\nfrom .. import a\nfrom . import helper\n")
    (src / "sub" / "c.py").write_text("class X:\n    def m(self):\n        import nsds.a\n")
    graph = {module: set(targets) for module, targets in import_edges(nsds_modules(src)).items()}
    assert graph == {
        "nsds": set(),
        "nsds.a": {"nsds.sub.b"},
        "nsds.sub": {"nsds.sub.c"},
        "nsds.sub.b": {"nsds.a", "nsds.sub"},  # `helper` is a name in nsds/sub/__init__.py, not a module
        "nsds.sub.c": {"nsds.a"},
    }
    assert shortest_cycle(graph) == ["nsds.a", "nsds.sub.b", "nsds.a"]
    assert shortest_cycle({"x": {"y"}, "y": set()}) is None


def test_no_import_cycles():
    modules = nsds_modules()
    assert len(modules) > 10, f"found only {sorted(modules)} under {SRC}"
    edges = import_edges(modules)
    cycle = shortest_cycle({module: set(targets) for module, targets in edges.items()})
    if cycle is not None:
        steps = [
            f"  {a} -> {b}  ({modules[a].relative_to(SRC.parent)} line {', '.join(map(str, edges[a][b]))})"
            for a, b in itertools.pairwise(cycle)
        ]
        pytest.fail("import cycle among nsds modules (shortest found):\n" + "\n".join(steps), pytrace=False)


def test_results_and_report_import_no_torch():
    """Reading and rendering saved results must work without loading torch (fast, and torch-free tools)."""
    code = (
        "import sys, nsds.results, nsds.report; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"importing nsds.results and nsds.report loaded torch:\n{done.stderr[-2000:]}"


def test_scorer_names_are_listed_once():
    from nsds.scorers.specs import BY_NAME, GROUPS, SCORERS, get_scorers

    names = [spec.name for spec in SCORERS]
    assert len(names) == len(set(names)), f"duplicated scorer names: {sorted(n for n in names if names.count(n) > 1)}"
    assert list(BY_NAME) == names
    assert get_scorers(["all"]) == list(SCORERS)
    assert GROUPS["baselines"] == [spec.name for spec in SCORERS if spec.kind == "baseline"]
    assert get_scorers(["baselines"]) == [spec for spec in SCORERS if spec.kind == "baseline"]
    assert GROUPS["baselines"], "no baseline scorers listed"


def test_tests_use_a_temporary_nsds_cache(real_nsds_cache, test_nsds_cache):
    """tests/conftest.py points NSDS_CACHE away from the user's cache, for this process and its children."""
    assert cache_dir().resolve() == test_nsds_cache
    assert cache_dir().resolve() != real_nsds_cache
    assert os.environ["NSDS_CACHE"] == str(test_nsds_cache)
    code = "from nsds.files import cache_dir; print(cache_dir())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert Path(child.stdout.strip()).resolve() == test_nsds_cache


def test_fetched_assets_still_resolve(real_nsds_cache, test_nsds_cache):
    try:
        real = assets.path("smollm2", root=real_nsds_cache)
    except NsdsError:
        needs.missing("asset 'smollm2' is not fetched in the real nsds cache")
    found = assets.path("smollm2")
    assert found.is_relative_to(test_nsds_cache)
    assert found.resolve() == real.resolve()
