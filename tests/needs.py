"""Optional peers in tests: skipped on a developer's machine that lacks them, required in CI.

CI (CI=true, as .ci/run runs) installs every peer through the project's own files, so a peer that
is missing there, or does not import, is a failed install, not a reason to skip its tests.
"""

from __future__ import annotations

import importlib
import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(module: str):
    """The imported module; in CI an ImportError fails the test instead of skipping it."""
    if IN_CI:
        try:
            return importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"{module} is required in CI (make install-dev installs it): {e}", pytrace=False)
    return pytest.importorskip(module)
