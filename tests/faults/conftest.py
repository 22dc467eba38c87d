"""Every fault test ends with no process left that runs in, or names, the suite's temp tree."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.jobs import assert_no_orphans


@pytest.fixture(autouse=True)
def _no_orphans(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    # Every worker of this suite keeps WORK_DIR (and its CLIs' cwd) under the base temp dir.
    assert_no_orphans(str(tmp_path_factory.getbasetemp()))
