"""Root conftest: keep every test out of the user's nsds cache.

At import, before any test (and before tests/unit or tests/integration conftests), NSDS_CACHE is pointed
at a fresh temporary folder for the whole session; subprocesses the tests start inherit it through
os.environ. The real cache's `models`, `text` and `tools` folders (the fetched, read-only assets and the
built llama.cpp tools) are symlinked into it so the real-model tests still find them; everything else
nsds writes to its cache (the sha256.json memo, oracle results) lands in the temporary folder, which is
removed when the session ends.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from nsds.files import cache_dir

import needs

REAL_CACHE: Path = cache_dir().resolve()
TEST_CACHE: Path = Path(tempfile.mkdtemp(prefix="nsds-test-cache-")).resolve()
ASSET_FOLDERS = ("models", "text", "tools")

for _folder in ASSET_FOLDERS:
    if (REAL_CACHE / _folder).is_dir():
        (TEST_CACHE / _folder).symlink_to(REAL_CACHE / _folder, target_is_directory=True)

os.environ["NSDS_CACHE"] = str(TEST_CACHE)
# rmtree unlinks the symlinks themselves and never descends into the real cache's folders
atexit.register(shutil.rmtree, TEST_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def real_nsds_cache() -> Path:
    """The user's nsds cache as it was before the tests redirected NSDS_CACHE (never write into it)."""
    return REAL_CACHE


@pytest.fixture(scope="session")
def test_nsds_cache() -> Path:
    """The session's temporary nsds cache (NSDS_CACHE), with the real cache's assets symlinked in."""
    return TEST_CACHE


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with two CPUs for one test module (the --ray tests; they skip without Ray)."""
    ray = needs.module("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
