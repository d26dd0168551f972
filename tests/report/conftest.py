"""Fixtures of the `fwdata report` tests (the datasets are made by report_datasets.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from report_datasets import make_built, make_truth


@pytest.fixture(scope="session")
def truth_ds(tmp_path_factory) -> Path:
    return make_truth(tmp_path_factory.mktemp("report") / "truth")


@pytest.fixture(scope="session")
def built_ds(truth_ds, tmp_path_factory) -> Path:
    return make_built(truth_ds, tmp_path_factory.mktemp("report") / "built")
