import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "jetblocks",
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("jetblocks")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny models run faster on one thread, and much
    faster than on two when the 2-core machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
