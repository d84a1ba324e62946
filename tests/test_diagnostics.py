"""Flow diagnostics: the loss split, per-coupling statistics, and the report that names
saturated couplings and couplings that stayed the identity."""

import json

import pytest
import torch

from jetblocks import Jet
from jetblocks.cli import main
from jetblocks.diagnostics import diagnose, report
from jetblocks.integrations.torchdata import open_source
from jetblocks.testing import perturb_parameters_


@pytest.fixture(scope="module")
def pixels():
    source = open_source("digits", "test")
    return torch.stack([source[i][0] for i in range(32)])


def run(model, pixels):
    return diagnose(model, pixels, generator=torch.Generator().manual_seed(0))


def test_the_loss_splits_into_prior_and_the_couplings_log_dets(digits_config, pixels):
    torch.manual_seed(0)
    jet = perturb_parameters_(Jet(digits_config), scale=0.1)
    d = run(jet, pixels)
    assert d["bits_per_dim"] == pytest.approx(d["prior_bits_per_dim"] - d["logdet_bits_per_dim"])
    expected = jet.bits_per_dim(pixels, generator=torch.Generator().manual_seed(0)).mean()
    assert d["bits_per_dim"] == pytest.approx(expected.item(), rel=1e-6)
    couplings = d["couplings"]
    assert len(couplings) == digits_config.depth
    total = sum(c["logdet_bits_per_dim"] for c in couplings.values())
    assert total == pytest.approx(d["logdet_bits_per_dim"], rel=1e-6)  # the only log-dets
    assert not any(c["saturated"] or c["identity"] for c in couplings.values())
    assert "no coupling is saturated" in report([{"step": 5, "diagnostics": d}])


def test_saturated_and_identity_couplings_are_named(digits_config, pixels):
    torch.manual_seed(0)
    jet = perturb_parameters_(Jet(digits_config), scale=0.1)
    first = jet.couplings.flows[0].conditioner.final_proj
    with torch.no_grad():  # raw scales of +12: s = 2 sigmoid(12), at the cap
        first.bias[first.bias.numel() // 2 :] = 12.0
    fresh = Jet(digits_config)  # zero-initialised outputs: every coupling is the identity
    saturated, identity = run(jet, pixels)["couplings"], run(fresh, pixels)["couplings"]
    names = list(saturated)
    assert saturated[names[0]]["saturated"] and saturated[names[0]]["at_cap"] == 1.0
    assert not any(saturated[n]["saturated"] for n in names[1:])
    assert all(c["identity"] and not c["saturated"] for c in identity.values())
    text = report([{"step": 1, "diagnostics": run(jet, pixels)}])
    assert f"saturated (1): {names[0]}" in text and "SATURATED" in text
    assert "still the identity (4)" in report([{"step": 1, "diagnostics": run(fresh, pixels)}])


def test_training_logs_diagnostics_and_gradient_norms_and_the_cli_reports_them(
    tmp_path, digits_config, capsys
):
    config = tmp_path / "jet.json"
    config.write_text(digits_config.to_json())
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--data", "digits", "--steps", "4",
                 "--batch-size", "16", "--log-every", "2", "--diagnose-every", "2",
                 "--eval-batch-size", "100", "--no-progress", "--out", str(out)]) == 0  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "grad_norm" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert all(r["grad_norm"] > 0 and 0 <= r["clipped"] <= 1 for r in logged)
    assert [r["step"] for r in records if "diagnostics" in r] == [2, 4]
    capsys.readouterr()
    assert main(["diagnose", str(out)]) == 0
    text = capsys.readouterr().out
    assert "gradient norm before clipping" in text and "step 4:" in text
    assert "couplings.flows.0" in text
    assert main(["diagnose", str(tmp_path)]) == 2  # not a run
