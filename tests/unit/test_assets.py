"""Offline assets: the text builders and Brown's halves by hand, the cache lookup, and checksum refusal."""

import io
import json
import tarfile

import pytest

from nsds import assets
from nsds.errors import NsdsError
from nsds.evaluate.corpora import half


def test_detokenize_brown_line():
    line = "The/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, and/cc (/( 5/cd )/) ./."
    assert assets.detokenize_brown_line(line) == 'The jury said "no evidence", and (5).'
    assert assets.detokenize_brown_line("It's/pps+bez 1/2/cd $/$ 3/cd !/.") == "It's 1/2 $3!"


def _tarball(path, files: list[tuple[str, str]]):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.open("rb")


def test_brown_text_from_tarball(tmp_path):
    files = [
        ("package/cb01", "\n\tB/np two/cd ./.\n"),
        ("package/ca01", "\n\tA/np one/cd ./.\n\n\tAgain/rb ./.\n"),
        ("package/README.md", "not a corpus file"),
    ]
    with _tarball(tmp_path / "brown.tgz", files) as handle:
        assert assets.brown_text_from_tarball(handle) == "A one. Again.\n\nB two.\n"


def test_moby_dick_text_from_tarball(tmp_path):
    chapters = [(f"package/data/chapter_{i}.json", json.dumps({"text": f" Chapter {i}. "})) for i in range(1, 136)]
    front = [("package/data/etymology.json", json.dumps({"text": "ETYMOLOGY"}))]
    files = [*front, *chapters[::-1], ("package/data/epilogue.json", json.dumps({"text": "The end."}))]
    with _tarball(tmp_path / "moby.tgz", files) as handle:
        text = assets.moby_dick_text_from_tarball(handle)
    assert text.startswith("Chapter 1.\n\nChapter 2.\n\n") and text.endswith("Chapter 135.\n\nThe end.\n")
    assert "ETYMOLOGY" not in text


def test_halves_split_at_the_paragraph_break_nearest_the_middle():
    text = "aa\n\nbbbbbbbb\n\nc\n"  # middle at 8: the break at 12 is nearer than the one at 2
    assert half(text, 0) == "aa\n\nbbbbbbbb\n" and half(text, 1) == "c\n"
    assert half("no break at all", 0) + half("no break at all", 1) == "no brea\nk at all\n"


def test_missing_asset_says_how_to_fetch(tmp_path):
    with pytest.raises(NsdsError, match="run `nsds assets fetch smollm2`"):
        assets.path("smollm2", root=tmp_path)


def test_fetch_rejects_unknown_names(tmp_path):
    with pytest.raises(NsdsError, match="known assets: smollm2, gemma3-270m, brown"):
        assets.fetch(["llama-70b"], root=tmp_path)
