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


def jacobian_logdet(fn, x):
    """``log|det J|`` of ``fn`` at each example of ``x`` (``fn`` maps a batch to a batch)."""
    rows = []
    for example in x:
        jac = torch.autograd.functional.jacobian(lambda e: fn(e[None])[0], example)
        rows.append(torch.linalg.slogdet(jac.reshape(example.numel(), example.numel()))[1])
    return torch.stack(rows)
