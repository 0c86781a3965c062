"""The shared-data fixture skips for a user without ../shared and fails under CI."""

import pytest

from conftest import skip_or_fail_in_ci


def test_missing_data_skips_without_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        skip_or_fail_in_ci("no data")


def test_missing_data_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        skip_or_fail_in_ci("no data")
