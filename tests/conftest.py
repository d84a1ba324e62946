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
