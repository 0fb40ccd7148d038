"""docs/DESIGN.md's layout names every source module, and names none that does not exist."""

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
