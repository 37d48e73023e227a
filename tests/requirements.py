"""Skip-or-fail for tests that need something outside Python.

Locally a missing binary or file skips the test with its reason; in CI (``CI=true``)
the same condition fails the test, so that nothing is skipped silently there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
UPSTREAM = SHARED / "upstream" / "mlsysops"


def missing(reason: str) -> None:
    """Skip (locally) or fail (in CI) the running test because ``reason``."""
    if IN_CI:
        pytest.fail(f"required in CI but missing: {reason}")
    pytest.skip(reason)


def need_binary(name: str, *extra_dirs: str) -> str:
    """Path of executable ``name`` (on PATH or in ``extra_dirs``), else skip/fail."""
    path = shutil.which(name) or next(
        (str(Path(d) / name) for d in extra_dirs if (Path(d) / name).exists()), None
    )
    if path is None:
        missing(f"the {name!r} executable is not installed (see .ci/run for how CI gets it)")
    return path  # type: ignore[return-value]


def need_upstream() -> Path:
    """The upstream MLSysOps data beside the checkout (../shared), else skip/fail."""
    if not UPSTREAM.is_dir():
        missing(f"{UPSTREAM} is absent: it sits beside the checkout in CI, not in a user's clone")
    return UPSTREAM


def need_seeds() -> Path:
    """The specification documents beside the checkout (../shared/seeds), else skip/fail."""
    seeds = SHARED / "seeds"
    if not seeds.is_dir():
        missing(f"{seeds} is absent: it sits beside the checkout in CI, not in a user's clone")
    return seeds
