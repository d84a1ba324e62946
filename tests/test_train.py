import dataclasses
import json
import math

import pytest
import torch

from jetblocks import Jet, JetConfig
from jetblocks.checkpoint import CheckpointError
from jetblocks.integrations.torchdata import image_loader, open_source
from jetblocks.train import (
    TrainConfig,
    Trainer,
    checkpoints_in,
    read_metrics,
    reference_optimizer,
    warmup_cosine,
)


def parameters(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def losses(out_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(out_dir) if "loss" in r]


class Killed(Exception):
    pass


def test_resumed_run_matches_an_uninterrupted_one(tmp_path, monkeypatch, make_trainer):
    straight = make_trainer(tmp_path / "straight")
    straight.fit()

    interrupted = make_trainer(tmp_path / "resumed")
    original_step = Trainer.train_step

    def step_then_die(self, batches):
        if self.step == 3:
            raise Killed
        return original_step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", step_then_die)
    with pytest.raises(Killed):
        interrupted.fit()
    monkeypatch.setattr(Trainer, "train_step", original_step)
    assert [p.name for p in checkpoints_in(tmp_path / "resumed")] == ["step_00000003"]

    resumed = make_trainer(tmp_path / "resumed")
    resumed.fit(resume=True)
    assert resumed.step == 6
    assert (parameters(resumed) - parameters(straight)).abs().max() < 1e-6
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 6


def test_training_lowers_the_loss_and_writes_its_outputs(tmp_path, make_trainer):
    trainer = make_trainer(tmp_path, steps=6)
    before = trainer.evaluate()["bits_per_dim"]
    after = trainer.fit()["bits_per_dim"]
    assert after < before
    assert (tmp_path / "samples" / "step_00000006.png").is_file()
    assert [p.name for p in checkpoints_in(tmp_path)] == ["step_00000003", "step_00000006"]
    files = {p.name for p in checkpoints_in(tmp_path)[-1].iterdir()}
    assert files == {"config.json", "model.safetensors", "README.md", "trainer.json",
                     "trainer.safetensors"}  # fmt: skip
    loaded = Jet.from_pretrained(checkpoints_in(tmp_path)[-1])
    torch.testing.assert_close(
        parameters(trainer), torch.cat([p.flatten() for p in loaded.parameters()])
    )


def test_only_the_last_k_checkpoints_are_kept(tmp_path, make_trainer):
    make_trainer(tmp_path, steps=9, keep_checkpoints=2).fit()
    assert [p.name for p in checkpoints_in(tmp_path)] == ["step_00000006", "step_00000009"]


def test_a_crash_during_save_leaves_the_previous_checkpoint_intact(
    tmp_path, monkeypatch, make_trainer
):
    trainer = make_trainer(tmp_path, steps=6)
    import jetblocks.train as train_module

    real_save_state = train_module.save_state
    calls = {"n": 0}

    def crash_on_second_save(directory, name, state):
        calls["n"] += 1
        if calls["n"] == 2:
            (directory / "trainer.json").write_text("{half")  # a partial write, then the crash
            raise OSError("disk full")
        real_save_state(directory, name, state)

    monkeypatch.setattr(train_module, "save_state", crash_on_second_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit()
    assert [p.name for p in checkpoints_in(tmp_path)] == ["step_00000003"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(train_module, "save_state", real_save_state)
    resumed = make_trainer(tmp_path, steps=6)
    resumed.fit(resume=True)
    assert resumed.step == 6


def test_resuming_with_another_config_names_the_mismatched_fields(
    tmp_path, make_trainer, digits_config
):
    make_trainer(tmp_path, steps=3).fit()
    other = JetConfig(**{**digits_config.to_dict(), "depth": 6, "emb_dim": 32})
    with pytest.raises(CheckpointError, match="depth: expected 6, checkpoint has 4.*emb_dim"):
        make_trainer(tmp_path, steps=6, jet_config=other).fit(resume=True)


def test_a_corrupt_checkpoint_is_refused(tmp_path, make_trainer):
    make_trainer(tmp_path, steps=3).fit()
    weights = checkpoints_in(tmp_path)[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        make_trainer(tmp_path, steps=6).fit(resume=True)
    (checkpoints_in(tmp_path)[-1] / "trainer.json").write_text("not json")
    with pytest.raises(CheckpointError, match="trainer.json is not valid JSON"):
        make_trainer(tmp_path, steps=6).fit(resume=True)


def test_gradient_accumulation_equals_one_big_batch(tmp_path, make_trainer):
    one = make_trainer(tmp_path / "one", steps=3)
    one.fit()
    two = make_trainer(tmp_path / "two", steps=3, grad_accum=2)
    two.train_loader = image_loader(open_source("digits", "train"), 8, seed=0)
    two.fit()
    assert (parameters(one) - parameters(two)).abs().max() < 1e-5


def test_ema_bf16_and_activation_checkpointing_run(tmp_path, make_trainer, digits_config):
    checkpointed = dataclasses.replace(digits_config, backprop="checkpoint")
    trainer = make_trainer(tmp_path, steps=3, jet_config=checkpointed, ema_decay=0.9, bf16=True)
    result = trainer.fit()
    assert math.isfinite(result["bits_per_dim"])
    ema = trainer.ema.module
    assert not torch.equal(parameters(trainer), torch.cat([p.flatten() for p in ema.parameters()]))
    resumed = make_trainer(tmp_path, steps=3, ema_decay=0.9)
    resumed.restore(checkpoints_in(tmp_path)[-1])
    torch.testing.assert_close(
        torch.cat([p.flatten() for p in resumed.ema.module.parameters()]),
        torch.cat([p.flatten() for p in ema.parameters()]),
    )


def test_activation_checkpointing_gives_the_same_gradients(digits_config):
    from jetblocks.testing import perturb_parameters_

    jet = perturb_parameters_(Jet(digits_config).double(), scale=0.1)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            jet.couplings.backprop = "checkpoint"
        jet.zero_grad()
        z, logdet = jet(x)
        (z.square().sum() - logdet.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in jet.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_weight_decay_is_decoupled_from_the_learning_rate_as_in_the_reference():
    config = TrainConfig(steps=10, lr=0.1, weight_decay=0.01, warmup_fraction=0.0)
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = reference_optimizer([theta], config)  # parameters, or a module
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(10, 0.0))
    schedule.step()  # t = 1: the schedule factor is (1 + cos(pi / 10)) / 2
    before = theta.detach().clone()
    theta.grad = torch.tensor([0.5, 0.25], dtype=torch.float64)
    optimizer.step()
    factor = 0.5 * (1 + math.cos(math.pi / 10))
    adam = theta.grad.sign() * (1 - 0.9) / (1 - 0.9) / (1 + 1e-8 / theta.grad.abs())  # m / sqrt(v)
    expected = before - factor * (config.lr * adam + config.weight_decay * before)
    torch.testing.assert_close(theta.detach(), expected, rtol=1e-7, atol=1e-9)


def test_schedule_warms_up_linearly_then_decays_to_zero():
    factor = warmup_cosine(100, 0.1)
    assert factor(0) == 0.0 and factor(5) == 0.5 and factor(10) == 1.0
    assert abs(factor(55) - 0.5) < 1e-12 and factor(100) == 0.0


def test_bad_training_settings_are_refused():
    with pytest.raises(
        ValueError, match="batch_size 10 must be divisible by world size x grad_accum = 1 x 4"
    ):
        TrainConfig(batch_size=10, grad_accum=4).local_batch_size(1)
    with pytest.raises(ValueError, match=r"TrainConfig.steps must be an int >= 1, got 0"):
        TrainConfig(steps=0)


def test_metrics_log_is_json_lines(tmp_path, make_trainer):
    make_trainer(tmp_path, steps=3).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert "eval_bits_per_dim" in records[-1] and records[0]["images_per_s"] > 0


def test_config_mismatch_names_nested_fields_and_ignores_runtime_settings():
    from jetblocks.checkpoint import config_mismatch

    saved = {"jet": {"depth": 4, "attention_backend": "sdpa"}, "width": 8}
    wanted = {"jet": {"depth": 6, "attention_backend": "math"}, "width": 8}
    assert config_mismatch(wanted, saved) == ["jet.depth: expected 6, checkpoint has 4"]
    assert config_mismatch({"width": 8, "attention_backend": "math"}, {"width": 8}) == []


def test_pretrained_jet_loads_with_another_attention_backend(tmp_path, digits_config):
    jet = Jet(digits_config)
    jet.save_pretrained(tmp_path / "jet")
    math_config = JetConfig(**{**digits_config.to_dict(), "attention_backend": "math"})
    loaded = Jet.from_pretrained(tmp_path / "jet", config=math_config)
    assert loaded.config.attention_backend == "math"
    torch.testing.assert_close(loaded.state_dict(), jet.state_dict())
    with pytest.raises(CheckpointError, match="depth: expected 5, checkpoint has 4"):
        Jet.from_pretrained(
            tmp_path / "jet", config=JetConfig(**{**digits_config.to_dict(), "depth": 5})
        )
