"""Shared fixtures.  Tests that read the PTB text in ../shared/data skip when it is absent,
except under CI (the ``CI`` environment variable set, as ``.ci/run`` does): CI always has the
folder, so a skip there would hide lost coverage, and the test fails instead."""

import importlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def skip_or_fail_in_ci(reason: str, allow_module_level: bool = False) -> None:
    """Skip a test for a user who lacks something; fail it under CI, which must have it."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: CI runs with ../shared beside the clone and "
                    f"every extra make installs)", pytrace=False)
    pytest.skip(reason, allow_module_level=allow_module_level)


def import_extra(module: str, extra: str):
    """``module`` of an optional extra, imported at a test module's top: the module's tests
    skip without it, except under CI (``make test`` installs every extra)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        skip_or_fail_in_ci(f"{module} is not installed (the {extra!r} extra)",
                           allow_module_level=True)


@pytest.fixture(scope="session")
def ptb_dir() -> Path:
    """Directory holding ptb.valid.txt and ptb.test.txt; skips the test when it is absent."""
    if not (SHARED_DATA / "ptb.valid.txt").is_file() or not (SHARED_DATA / "ptb.test.txt").is_file():
        skip_or_fail_in_ci(f"PTB data not found in {SHARED_DATA}")
    return SHARED_DATA
