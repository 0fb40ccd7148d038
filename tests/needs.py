"""What a test needs from the machine. A missing asset, llama.cpp tool or test extra skips the test with its
reason, except where NSDS_REQUIRE_ASSETS=1 (set by .ci/run, after `nsds assets fetch` and the test extras
provided everything): there it fails, so a skip cannot hide a broken fetch or install."""

import importlib
import os
from types import ModuleType

import pytest

REQUIRED = os.environ.get("NSDS_REQUIRE_ASSETS") == "1"


def missing(reason: str) -> None:
    """Skip the test with `reason`, or fail it where everything is required."""
    if REQUIRED:
        pytest.fail(f"{reason} (NSDS_REQUIRE_ASSETS=1: nothing may be missing)")
    pytest.skip(reason)


def module(name: str) -> ModuleType:
    """The named module, or missing(...) when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        missing(f"needs the package '{name}': {err}")
        raise  # unreachable: missing() skips or fails
