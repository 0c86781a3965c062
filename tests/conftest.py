"""Shared fixtures.  Tests that read the PTB text in ../shared/data skip when it is absent,
except under CI (the ``CI`` environment variable set, as ``.ci/run`` does): CI always has the
folder, so a skip there would hide lost coverage, and the test fails instead."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def skip_or_fail_in_ci(reason: str) -> None:
    """Skip a test for a user who lacks something; fail it under CI, which must have it."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: CI runs with ../shared beside the clone)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def ptb_dir() -> Path:
    """Directory holding ptb.valid.txt and ptb.test.txt; skips the test when it is absent."""
    if not (SHARED_DATA / "ptb.valid.txt").is_file() or not (SHARED_DATA / "ptb.test.txt").is_file():
        skip_or_fail_in_ci(f"PTB data not found in {SHARED_DATA}")
    return SHARED_DATA
