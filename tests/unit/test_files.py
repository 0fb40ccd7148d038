"""Outputs reach their place whole and as ordinary files: a tool's output through `staged`, a command's
folder through `staged_folder` and `publish` (readable by others, as any file a user makes); a download is
streamed, hashed, and refused whole when its checksum is not the pinned one."""

import hashlib
import io
import stat
from pathlib import Path

import pytest

from nsds.errors import NsdsError
from nsds.files import atomic_write, check_digest, download, publish, staged, staged_folder


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


def test_a_folder_output_replaces_the_earlier_one_and_a_stale_one_goes(tmp_path: Path) -> None:
    target = tmp_path / "nsds-run"
    (target / "model").mkdir(parents=True)
    (target / "model" / "old.safetensors").write_bytes(b"old")
    with staged_folder(target) as folder:
        (folder / "model").mkdir()
        (folder / "model" / "config.json").write_text("{}")
        assert publish(folder, target, ["model"]) == []
    assert [p.name for p in (target / "model").iterdir()] == ["config.json"]
    with staged_folder(target) as folder:
        (folder / "plan.json").write_text("{}")
        assert publish(folder, target, ["plan.json", "model"]) == ["model"]
    assert [p.name for p in target.iterdir()] == ["plan.json"]


def test_a_download_is_hashed_and_a_wrong_one_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    source.write_bytes(b"not the pinned sdist")
    buffer = io.BytesIO()
    assert download(source.as_uri(), buffer, "downloading") == hashlib.sha256(b"not the pinned sdist").hexdigest()
    assert buffer.getvalue() == b"not the pinned sdist"
    target = tmp_path / "cache" / source.name
    with pytest.raises(NsdsError, match=r"checksum mismatch for the sdist: got sha256 [0-9a-f]{64}, expected 00"):
        atomic_write(target, lambda out: check_digest("the sdist", download(source.as_uri(), out, "d"), "00" * 32))
    assert list(target.parent.iterdir()) == []


def test_a_download_that_fails_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(NsdsError, match=r"cannot download file://.*missing\.tgz: "):
        download((tmp_path / "missing.tgz").as_uri(), io.BytesIO(), "downloading")
