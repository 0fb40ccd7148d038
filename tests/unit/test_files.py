"""Outputs reach their place whole and as ordinary files: a tool's output through `staged`, a command's
folder through `staged_folder` and `publish` (readable by others, as any file a user makes)."""

import stat
from pathlib import Path

import pytest

from nsds.errors import NsdsError
from nsds.files import publish, staged, staged_folder


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_staged_tool_output_is_an_ordinary_file(tmp_path: Path) -> None:
    target = tmp_path / "model.gguf"
    with staged(target, "llama-quantize") as path:
        path.write_bytes(b"GGUF")  # as a tool does: truncate and write the file it was given
    assert target.read_bytes() == b"GGUF" and _mode(target) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_a_staged_output_the_tool_left_empty_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    with (
        pytest.raises(NsdsError, match="llama-quantize reported success but wrote nothing"),
        staged(tmp_path / "model.gguf", "llama-quantize"),
    ):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_published_new_folder_is_an_ordinary_folder(tmp_path: Path) -> None:
    target = tmp_path / "nsds-run"
    with staged_folder(target) as folder:
        (folder / "plan.json").write_text("{}")
        assert publish(folder, target, ["plan.json"]) == []
    assert _mode(target) == 0o755 and (target / "plan.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nsds-run"]


def test_publishing_into_an_earlier_folder_removes_its_stale_outputs(tmp_path: Path) -> None:
    target = tmp_path / "nsds-run"
    target.mkdir()
    (target / "model.gguf").write_bytes(b"old")
    (target / "mine.txt").write_text("kept")
    with staged_folder(target) as folder:
        (folder / "plan.json").write_text("{}")
        assert publish(folder, target, ["plan.json", "model.gguf"]) == ["model.gguf"]
    assert sorted(p.name for p in target.iterdir()) == ["mine.txt", "plan.json"]
