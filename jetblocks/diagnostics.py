"""What a flow's loss is made of, coupling by coupling: the failure modes of Jet-style flows.

A flow's bits/dim is a prior term minus a log-det term,

    bpd = nll_prior(z) / (D ln 2) + log2(127.5) - logdet / (D ln 2),

and the log-det is the sum of every coupling's ``sum log s`` with ``s = cap * sigmoid(raw)``.
Three things go wrong in practice, and :func:`diagnose` measures each on a batch:

- the loss is pushed down by inflating the log-det while the prior term grows (the split
  of the loss shows it);
- coupling scales pinned at the cap (``s`` within 5% of ``cap``): the coupling has stopped
  learning and its log-det contribution is fixed (``saturated``: at least a quarter of its
  scales there);
- couplings that stayed the identity (``|log s|`` and ``|bias|`` both below ``1e-3`` on
  average): capacity that does nothing.

The gradient norm before clipping, and how often the clip acts, are logged by the
:class:`~jetblocks.train.Trainer`; :func:`report` turns a run's records into text
(``jetblocks diagnose RUN``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from jetblocks.couplings import AffineCoupling
from jetblocks.flow import logdet_dtype
from jetblocks.likelihood import bits_per_dim, dequantize

__all__ = ["IDENTITY_TOLERANCE", "SATURATED_SHARE", "SATURATION_MARGIN", "diagnose", "report"]

SATURATION_MARGIN = 0.05  # a scale within 5% of the cap is at the cap
SATURATED_SHARE = 0.25  # a coupling with this share of its scales at the cap is saturated
IDENTITY_TOLERANCE = 1e-3  # mean |log s| and mean |bias| below this: the identity


@torch.no_grad()
def diagnose(
    model: nn.Module, images: Tensor, *, generator: torch.Generator | None = None
) -> dict[str, Any]:
    """The loss split and every coupling's statistics on ``images`` (uint8 ``[B, C, H, W]``,
    dequantized with ``generator``'s noise), in eval mode.

    Returns ``{"bits_per_dim", "prior_bits_per_dim", "logdet_bits_per_dim", "couplings":
    {name: {"logdet_bits_per_dim", "mean_abs_log_scale", "mean_abs_bias", "at_cap",
    "saturated", "identity"}}}``; the log-det terms are bits/dim *removed* from the loss.
    """
    couplings = {name: m for name, m in model.named_modules() if isinstance(m, AffineCoupling)}
    stats: dict[str, dict[str, Any]] = {}

    def record(name: str):
        def hook(module: AffineCoupling, args: tuple, kwargs: dict, output: tuple) -> None:
            x = args[0]
            context = args[1] if len(args) > 1 else kwargs.get("context")
            x1 = module.split(x)[0].chunk(2, dim=-1)[0]
            bias, scale, _ = module.affine_params(x1, context, logdet_dtype(x))
            log_scale = scale.log()
            stats[name] = {
                "logdet": output[1].double(),
                "mean_abs_log_scale": log_scale.abs().mean().item(),
                "mean_abs_bias": bias.abs().mean().item(),
                "at_cap": (scale >= (1 - SATURATION_MARGIN) * module.scale_factor)
                .double()
                .mean()
                .item(),
            }

        return hook

    handles = [
        m.register_forward_hook(record(name), with_kwargs=True) for name, m in couplings.items()
    ]
    training = model.training
    model.eval()
    try:
        z, logdet = model(dequantize(images, generator=generator))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    num_dims = z[0].numel()
    to_bits = 1.0 / (num_dims * math.log(2.0))
    total = bits_per_dim(z, logdet).mean().item()
    removed = (logdet.double() * to_bits).mean().item()
    result: dict[str, Any] = {
        "bits_per_dim": total,
        "prior_bits_per_dim": total + removed,
        "logdet_bits_per_dim": removed,
        "couplings": {},
    }
    for name, s in stats.items():
        result["couplings"][name] = {
            "logdet_bits_per_dim": (s.pop("logdet") * to_bits).mean().item(),
            **s,
            "saturated": s["at_cap"] >= SATURATED_SHARE,
            "identity": s["mean_abs_log_scale"] < IDENTITY_TOLERANCE
            and s["mean_abs_bias"] < IDENTITY_TOLERANCE,
        }
    return result


def report(records: Iterable[dict[str, Any]]) -> str:
    """A run's diagnosis as text, from its ``metrics.jsonl`` records: the latest loss split
    and couplings, gradient norms and clipping, and the couplings that need attention."""
    records = list(records)
    diagnosed = [r for r in records if "diagnostics" in r]
    trained = [r for r in records if "grad_norm" in r]
    if not diagnosed and not trained:
        return "no diagnostics in this run (train with --diagnose-every N)"
    lines = []
    if trained:
        last = trained[-1]
        norms = [r["grad_norm"] for r in trained]
        clipped = sum(r.get("clipped", 0.0) for r in trained) / len(trained)
        lines.append(
            f"gradient norm before clipping: last {last['grad_norm']:.3g} (step {last['step']}), "
            f"max {max(norms):.3g}; the clip acted on {100 * clipped:.0f}% of logged steps"
        )
    if diagnosed:
        last = diagnosed[-1]
        d = last["diagnostics"]
        lines.append(
            f"step {last['step']}: {d['bits_per_dim']:.4f} bits/dim = prior "
            f"{d['prior_bits_per_dim']:.4f} - log-det {d['logdet_bits_per_dim']:.4f}"
        )
        lines.append(f"{'coupling':<36} {'log-det b/d':>11} {'|log s|':>8} {'at cap':>7}")
        for name, c in d["couplings"].items():
            flag = " SATURATED" if c["saturated"] else " IDENTITY" if c["identity"] else ""
            lines.append(
                f"{name:<36} {c['logdet_bits_per_dim']:>11.4f} {c['mean_abs_log_scale']:>8.4f} "
                f"{100 * c['at_cap']:>6.1f}%{flag}"
            )
        saturated = [n for n, c in d["couplings"].items() if c["saturated"]]
        identity = [n for n, c in d["couplings"].items() if c["identity"]]
        if saturated:
            lines.append(
                f"saturated ({len(saturated)}): {', '.join(saturated)}: at least "
                f"{100 * SATURATED_SHARE:.0f}% of their scales within "
                f"{100 * SATURATION_MARGIN:.0f}% of the cap; lower the learning rate, or "
                "raise scale_factor"
            )
        if identity:
            lines.append(
                f"still the identity ({len(identity)}): {', '.join(identity)}: they have "
                "not learned; train longer or check that gradients reach them"
            )
        if not saturated and not identity:
            lines.append("no coupling is saturated or stayed the identity")
    return "\n".join(lines)
