"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from lshattn import kernels


@pytest.fixture
def native_kernels(monkeypatch):
    """``native_kernels(False)`` runs the pure-torch path instead of the native kernels (and
    ``True`` brings them back); the choice ends with the test."""

    def choose(enabled: bool) -> None:
        monkeypatch.setenv("LSHATTN_NATIVE", "1" if enabled else "0")
        kernels.load.cache_clear()

    yield choose
    kernels.load.cache_clear()  # the environment is restored after this, before the next load


try:
    from hypothesis import settings
except ImportError:  # the test extra installs it; without it the property-based tests skip
    settings = None

if settings is not None:
    # The property-based suite (tests/test_property_based.py) sizes each test as a share of
    # max_examples. "ci", the default: a fixed, derandomised budget (the same examples every run),
    # no deadline (an example may take a second), nothing written to an example database.
    # "slow" (--hypothesis-profile=slow): the same tests with fresh random examples, > 10,000 in all.
    settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None, database=None)
    settings.register_profile("slow", max_examples=800, derandomize=False, deadline=None, database=None, print_blob=True)
    settings.load_profile("ci")
