"""Shared test set-up: deterministic, single-threaded torch so that xdist workers share the cores."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    torch.set_num_threads(1)
