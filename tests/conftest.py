"""Shared test fixtures."""

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
"""Real image data shared by developer machines and CI (see its README.md); never copied into the repo."""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; skips the test where it is absent (e.g. on a user's machine)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent; it holds the MedMNIST and CIFAR-10 test files")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test: on a busy 2-core machine, two threads fighting other processes make small ops many
    times slower. (Ray workers set their own thread count from --cpus-per-holder.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
