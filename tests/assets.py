"""The offline models and data the tests read (docs/offline-assets.md), or a skip naming the
package that provides them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest

from lshattn import data

T = TypeVar("T")


def or_skip(load: Callable[[], T]) -> T:
    """``load()``, or skip the test with the install command when its package is missing."""
    try:
        return load()
    except data.MissingPackageError as err:
        pytest.skip(str(err))
