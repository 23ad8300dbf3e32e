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
    # Profiles of the property-based suite (tests/test_property_based.py), whose tests each take
    # a share of max_examples.
    # "ci", the default: a fixed budget, derandomised (the same examples on every run, so a
    # failure reproduces), no deadline (an example may take a second on a loaded machine),
    # nothing written to an example database. About 4,000 examples in all, half a minute.
    settings.register_profile("ci", max_examples=300, derandomize=True, deadline=None, database=None)
    # "slow" (pytest --hypothesis-profile=slow): the same tests with fresh random examples on every
    # run, about 13,500 in all; a failure prints the blob to replay it with @reproduce_failure.
    settings.register_profile(
        "slow", max_examples=1000, derandomize=False, deadline=None, database=None, print_blob=True
    )
    settings.load_profile("ci")
