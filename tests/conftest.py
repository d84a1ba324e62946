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


@pytest.fixture
def digits_config():
    """A small Jet for the built-in 8x8 ``digits`` set: channel and spatial couplings."""
    from jetblocks import JetConfig

    return JetConfig(
        image_size=(8, 8),
        channels=1,
        patch_size=2,
        depth=4,
        block_depth=1,
        emb_dim=16,
        num_heads=2,
        kinds=("channels", "spatial"),
    )
