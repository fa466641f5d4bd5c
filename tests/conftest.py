"""Shared fixtures. One local Ray instance for the whole test session (never `ray stop`)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits():
    from raysys import datasets

    return datasets.load("digits")


@pytest.fixture
def mlflow_uri(tmp_path):
    """An absolute sqlite tracking URI private to the test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
