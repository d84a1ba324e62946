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


@pytest.fixture(scope="session", autouse=True)
def _temporary_cache(tmp_path_factory):
    """jetblocks' cache (image folder indexes) in a temporary folder, never ~/.cache; the
    commands that tests run as subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JETBLOCKS_CACHE", str(tmp_path_factory.mktemp("jetblocks-cache")))
        yield


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


@pytest.fixture(scope="session")
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


@pytest.fixture
def make_trainer(digits_config):
    """``make_trainer(out_dir, steps=6, jet_config=None, task=None, loader=None,
    **train_settings)``: a :class:`~jetblocks.train.Trainer` of a fresh Jet on the built-in
    digits (or ``loader``'s batches), batches of 16, a checkpoint every 3 steps and one
    evaluation at the end."""
    from jetblocks import Jet
    from jetblocks.integrations.torchdata import image_loader, open_source
    from jetblocks.train import BitsPerDimTask, TrainConfig, Trainer

    def make(out_dir, steps=6, jet_config=None, task=None, loader=None, **overrides):
        torch.manual_seed(0)
        jet_config = jet_config or digits_config
        settings = dict(steps=steps, batch_size=16, lr=3e-3, log_every=1, eval_every=steps,
                        checkpoint_every=3, progress=False, samples_per_temperature=2)  # fmt: skip
        config = TrainConfig(**{**settings, **overrides})
        if loader is None:
            loader = image_loader(
                open_source("digits", "train"), config.local_batch_size(1), seed=0
            )
        test = open_source("digits", "test")
        return Trainer(
            Jet(jet_config),
            task or BitsPerDimTask(),
            config,
            model_config=jet_config.to_dict(),
            train_loader=loader,
            eval_batches=lambda: image_loader(
                test, 100, seed=0, shuffle=False, drop_last=False, epochs=1
            ),
            out_dir=out_dir,
        )

    return make
