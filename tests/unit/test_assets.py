"""Offline assets: the Brown detokenizer by hand, the cache lookup, and checksum refusal."""

import hashlib
import io
import tarfile

import pytest

from nsds import assets
from nsds.errors import NsdsError


def test_detokenize_brown_line():
    line = "The/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, and/cc (/( 5/cd )/) ./."
    assert assets.detokenize_brown_line(line) == 'The jury said "no evidence", and (5).'
    assert assets.detokenize_brown_line("It's/pps+bez 1/2/cd $/$ 3/cd !/.") == "It's 1/2 $3!"


def test_brown_text_from_tarball(tmp_path):
    archive = tmp_path / "brown.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        files = [
            ("package/cb01", "\n\tB/np two/cd ./.\n"),
            ("package/ca01", "\n\tA/np one/cd ./.\n\n\tAgain/rb ./.\n"),
            ("package/README.md", "not a corpus file"),
        ]
        for name, text in files:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with archive.open("rb") as handle:
        assert assets.brown_text_from_tarball(handle) == "A one. Again.\n\nB two.\n"


def test_missing_asset_says_how_to_fetch(tmp_path):
    with pytest.raises(NsdsError, match="run `nsds assets fetch smollm2`"):
        assets.path("smollm2", root=tmp_path)


def test_checksum_mismatch_is_refused():
    with pytest.raises(NsdsError, match="checksum mismatch"):
        assets._check_digest("x", hashlib.sha256(b"a").hexdigest(), assets.BROWN_TGZ_SHA256)


def test_fetch_rejects_unknown_names(tmp_path):
    with pytest.raises(NsdsError, match="known assets: smollm2, gemma3-270m, brown"):
        assets.fetch(["llama-70b"], root=tmp_path)
