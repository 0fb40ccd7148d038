"""The docs describe the project as it is: DESIGN.md's layout names every source module and none that does not
exist, the README's results table is generated, its test command is what CI runs, and every link resolves."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "src" / "nsds"


def _layout() -> str:
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    block = text[text.index("## Layout") :]
    return block[block.index("```") : block.index("```", block.index("```") + 3)]


def test_every_source_module_is_in_the_layout():
    layout = _layout()
    named = set(re.findall(r"\b([a-z_]+)\.py\b", layout)) | set(re.findall(r"\b([a-z_]+)/", layout))
    modules = {p.stem for p in SOURCE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    packages = {p.name for p in SOURCE.iterdir() if (p / "__init__.py").is_file()}
    assert modules - named == set(), "modules missing from docs/DESIGN.md's layout"
    assert packages - named == set(), "packages missing from docs/DESIGN.md's layout"


def test_every_module_the_layout_names_exists():
    layout = _layout()
    existing = {p.stem for p in SOURCE.rglob("*.py")} | {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    assert set(re.findall(r"\b([a-z_]+)\.py\b", layout)) - existing == set()


def test_the_readme_results_table_is_the_one_generated_from_the_contest(monkeypatch):
    """The README's one results table cannot drift from docs/results/imatrix-contest.json."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import results

    readme = (ROOT / "README.md").read_text()
    assert results.readme_kld_table()
    assert results.readme_with_table(readme) == readme, "run: python benchmarks/results.py --page-only --readme-table"


def test_ci_runs_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv") and "pytest" in line]
    assert len(commands) == 1
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[0] in ci


def test_every_relative_link_in_the_docs_exists():
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
