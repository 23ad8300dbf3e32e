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
