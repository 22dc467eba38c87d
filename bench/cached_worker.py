"""`python -m bench.cached_worker`: `python -m app serve` with the repository cache wired in
the one place the job runner needs it (every `git.clone` gets `cache=`), for the benchmarks,
until app/jobs.py passes `RunnerDeps.repo_cache` itself (see docs/PERFORMANCE.md, "Repository
cache"). Settings as usual from the environment (REPO_CACHE_DIR, REPO_CACHE_MAX_BYTES).
"""

from __future__ import annotations

import functools
import os
import sys

from app import cli
from app.adapters import git
from app.adapters.repo_cache import RepoCache
from app.config import load_settings


def main() -> int:
    cache = RepoCache.from_settings(load_settings(dict(os.environ)))
    if cache is not None:
        git.clone = functools.partial(git.clone, cache=cache)  # type: ignore[assignment]
    return cli.main(["serve"])


if __name__ == "__main__":
    sys.exit(main())
