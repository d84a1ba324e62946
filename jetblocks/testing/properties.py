"""The individual properties of the flow contract, each a function that raises on failure.

For a flow ``f`` with per-example maps ``f_b`` and log-dets ``ld_f``, ``ld_{f^-1}``:

    round trips      f^-1(f(x)) = x,  f(f^-1(y)) = y
    log-dets         ld_f(x) = log|det J_f(x)|,  ld_{f^-1}(y) = log|det J_{f^-1}(y)|
    consistency      ld_f(x) = -ld_{f^-1}(f(x))

where ``J`` is the autograd Jacobian of one example's map. Values are compared with
``|received - expected| <= atol + rtol * |expected|``; log-dets with ``atol * sqrt(n)``
(``n`` the number of elements per example) in place of ``atol``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

__all__ = [
    "PROPERTIES",
    "FlowCheckError",
    "Subject",
    "check_batch_independence",
    "check_determinism",
    "check_finite",
    "check_gradients",
    "check_logdet_consistency",
    "check_logdet_jacobian",
    "check_round_trip",
    "check_shapes",
    "check_state_dict",
    "per_example_log_abs_det",
]

PROPERTIES: dict[str, str] = {
    "setup": "the flow can be copied (or built by its factory), cast to the dtype and perturbed",
    "shapes": "output shape [B, *output_shape] and dtype, log-det shape [B] and dtype",
    "finite": "outputs and log-dets are finite",
    "no_input_mutation": "the flow does not modify its input or context in place",
    "determinism": "the same input gives the same output and log-det",
    "batch_independence": "an example's output and log-det do not depend on its batch-mates",
    "round_trip_x": "inverse(forward(x)) == x",
    "round_trip_y": "forward(inverse(y)) == y",
    "forward_logdet": "the forward log-det == log|det| of the autograd Jacobian of x -> f(x)",
    "inverse_logdet": "the inverse log-det == log|det| of the autograd Jacobian of y -> f^-1(y)",
    "logdet_consistency": "the forward log-det at x == minus the inverse log-det at f(x)",
    "gradients": "gradients reach every trainable parameter and the input (and, in float64, "
    "agree with central finite differences)",
    "state_dict": "a fresh copy loaded with state_dict() gives identical outputs",
}


class FlowCheckError(AssertionError):
    """A flow broke a property of the flow contract.

    ``property`` is one of :data:`PROPERTIES`; ``error`` and ``tolerance`` are the largest
    error found and the tolerance it was held to (``None`` when not numeric); ``blob`` is
    hypothesis's reproduction blob of the failing example, when one was generated.
    """

    def __init__(
        self,
        message: str,
        *,
        property: str,
        error: float | None = None,
        tolerance: float | None = None,
        blob: bytes | None = None,
    ) -> None:
        super().__init__(message)
        self.property, self.error, self.tolerance, self.blob = property, error, tolerance, blob


def _fail(prop: str, detail: str, error: float | None = None, tolerance: float | None = None):
    return FlowCheckError(detail, property=prop, error=error, tolerance=tolerance)


class Subject:
    """The flow under test, how to call it, and the tolerances it is held to."""

    def __init__(
        self,
        module: nn.Module,
        *,
        event_shape: tuple[int, ...],
        output_shape: tuple[int, ...],
        atol: float,
        rtol: float,
        check_mutation: bool = True,
    ) -> None:
        self.module, self.event_shape, self.output_shape = module, event_shape, output_shape
        self.atol, self.rtol, self.check_mutation = atol, rtol, check_mutation
        self.logdet_atol = atol * math.sqrt(max(1, math.prod(event_shape)))
        self.value_tol = (atol, rtol)
        self.logdet_tol = (self.logdet_atol, rtol)

    def call(
        self, direction: str, inp: Tensor, context: Tensor | None, *, protect: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Run ``forward`` or ``inverse``; with ``protect`` the flow gets copies of the inputs,
        which must come back unchanged (property ``no_input_mutation``)."""
        fn = self.module if direction == "forward" else self.module.inverse
        args = [inp] if context is None else [inp, context]
        given = [a.clone() for a in args] if protect else args
        result = fn(*given)
        if protect and self.check_mutation:
            for name, before, after in zip(("input", "context"), args, given, strict=False):
                if not torch.equal(before, after):
                    error = (after.double() - before.double()).abs().max().item()
                    raise _fail(
                        "no_input_mutation",
                        f"{direction}() modified its {name} in place (largest change "
                        f"{error:.3g}); expected the {name} to be left unchanged, as "
                        f"callers reuse it (clone it before writing into it)",
                        error,
                        0.0,
                    )
        if not (
            isinstance(result, tuple | list)
            and len(result) == 2
            and all(isinstance(t, Tensor) for t in result)
        ):
            raise _fail(
                "shapes",
                f"{direction}() must return a pair (output, logdet) of tensors, "
                f"got {type(result).__name__}",
            )
        return result[0], result[1]


def expected_logdet_dtype(dtype: torch.dtype) -> torch.dtype:
    """The contract's log-det dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _worst(
    received: Tensor, expected: Tensor, atol: float, rtol: float
) -> tuple[bool, float, float, tuple[int, ...], float, float]:
    """``(ok, error, tolerance, index, received, expected)`` at the worst element (the
    largest ``error / tolerance``); NaN counts as an infinite error."""
    received, expected = received.detach().double(), expected.detach().double()
    error = (received - expected).abs()
    error = torch.where(torch.isnan(error), torch.full_like(error, math.inf), error)
    tolerance = atol + rtol * expected.abs()
    ratio = torch.where(error > 0, error / tolerance.clamp_min(1e-300), torch.zeros_like(error))
    if not ratio.numel():
        return True, 0.0, atol, (), 0.0, 0.0
    flat = int(ratio.flatten().argmax())
    index = []
    for size in reversed(ratio.shape):
        flat, i = divmod(flat, size)
        index.insert(0, i)
    index = tuple(index)
    ok = bool((error <= tolerance).all())
    values = (error, tolerance, received, expected)
    err, tol, got, want = (float(t[index]) for t in values)
    return ok, err, tol, index, got, want


def _compare(
    prop: str,
    what: str,
    received: Tensor,
    expected: Tensor,
    tolerance: tuple[float, float],
    names: tuple[str, str] = ("received", "expected"),
) -> None:
    """Raise a :class:`FlowCheckError` for ``prop`` unless ``received ~ expected`` within
    ``tolerance = (atol, rtol)``; ``names`` label the two sides in the message."""
    if received.shape != expected.shape:
        raise _fail(
            prop,
            f"{what}: expected shape {list(expected.shape)}, received {list(received.shape)}",
        )
    atol, rtol = tolerance
    ok, error, bound, index, got, want = _worst(received, expected, atol, rtol)
    if not ok:
        where = f"example {index[0]}" + (f", element {index[1:]}" if len(index) > 1 else "")
        raise _fail(
            prop,
            f"{what}\n  largest error {error:.3g} at {where}, tolerance there {bound:.3g} "
            f"(atol {atol:.2g} + rtol {rtol:.2g} * |expected|)\n"
            f"  {names[1]}: {want:.10g}\n  {names[0]}: {got:.10g}",
            error,
            bound,
        )


def _compare_results(
    prop: str,
    what: str,
    received: tuple[Tensor, Tensor],
    expected: tuple[Tensor, Tensor],
    subject: Subject,
    names: tuple[str, str],
) -> None:
    """Compare two ``(output, logdet)`` results, each part with its own tolerance."""
    _compare(prop, f"{what} the output", received[0], expected[0], subject.value_tol, names)
    _compare(prop, f"{what} the log-det", received[1], expected[1], subject.logdet_tol, names)


def check_shapes(
    subject: Subject, direction: str, inp: Tensor, out: Tensor, logdet: Tensor
) -> None:
    """``out`` is ``[B, *event]`` of the input's dtype; ``logdet`` is ``[B]`` of the
    contract's dtype."""
    batch = inp.shape[0]
    event = subject.output_shape if direction == "forward" else subject.event_shape
    problems = []
    if tuple(out.shape) != (batch, *event):
        problems.append(
            f"output shape: expected [B, *{'output' if direction == 'forward' else 'event'}"
            f"_shape]={[batch, *event]}, received {list(out.shape)}"
        )
    if out.dtype != inp.dtype:
        problems.append(f"output dtype: expected {inp.dtype} (the input's), received {out.dtype}")
    if tuple(logdet.shape) != (batch,):
        problems.append(
            f"log-det shape: expected [B]=[{batch}] (one value per example, summed over every "
            f"non-batch element), received {list(logdet.shape)}"
        )
    want = expected_logdet_dtype(inp.dtype)
    if logdet.dtype != want:
        problems.append(
            f"log-det dtype: expected {want} for {inp.dtype} input, received {logdet.dtype}"
        )
    if problems:
        raise _fail(
            "shapes",
            f"{direction}(): " + "; ".join(problems) + f"\n  received from {direction}(): "
            f"output {list(out.shape)} ({out.dtype}), log-det {list(logdet.shape)} "
            f"({logdet.dtype})",
        )


def check_finite(direction: str, out: Tensor, logdet: Tensor) -> None:
    """Every output element and log-det is finite (inputs are bounded and finite)."""
    for name, t in (("output", out), ("log-det", logdet)):
        bad = ~torch.isfinite(t)
        if bad.any():
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise _fail(
                "finite",
                f"{direction}() returned a non-finite {name}: {int(bad.sum())} of "
                f"{t.numel()} values, first at index {first} = {t[first].item()}; expected "
                "finite values for bounded finite inputs",
                math.inf,
                0.0,
            )


def check_determinism(
    subject: Subject,
    direction: str,
    inp: Tensor,
    context: Tensor | None,
    out: Tensor,
    logdet: Tensor,
) -> None:
    """Calling again on the same input gives the same output and log-det."""
    again = subject.call(direction, inp, context)
    what = f"{direction}() called twice on the same input gave different results; in"
    _compare_results(
        "determinism", what, again, (out, logdet), subject, ("second call", "first call")
    )


def check_batch_independence(
    subject: Subject,
    direction: str,
    inp: Tensor,
    context: Tensor | None,
    out: Tensor,
    logdet: Tensor,
) -> None:
    """Every example computed alone (a batch of one) matches its value in the full batch."""
    batch = inp.shape[0]
    for b in range(batch):
        alone = subject.call(direction, inp[b : b + 1], _row(context, b))
        what = (
            f"{direction}() of example {b} computed alone (batch of 1) differs from the same "
            f"example inside a batch of {batch}: its batch-mates leak into it (batch "
            "statistics?); in"
        )
        in_batch = (out[b : b + 1], logdet[b : b + 1])
        _compare_results(
            "batch_independence", what, in_batch, alone, subject, ("in the batch", "alone")
        )


def _row(context: Tensor | None, b: int) -> Tensor | None:
    return None if context is None else context[b : b + 1]


def check_round_trip(
    subject: Subject, which: str, start: Tensor, context: Tensor | None, there: Tensor
) -> tuple[Tensor, Tensor]:
    """``which == "x"``: ``inverse(there)`` must give back ``start`` (``there = f(start)``);
    ``"y"``: ``forward(there)`` must give back ``start``. Returns the call's result."""
    direction = "inverse" if which == "x" else "forward"
    back, back_logdet = subject.call(direction, there, context)
    what = (
        "inverse(forward(x)) does not give back x"
        if which == "x"
        else "forward(inverse(y)) does not give back y"
    )
    if context is not None:
        what += " (with the same context in both directions)"
    received = "inverse(forward(x))" if which == "x" else "forward(inverse(y))"
    _compare(f"round_trip_{which}", what, back, start, subject.value_tol, (received, which))
    return back, back_logdet


def per_example_log_abs_det(
    fn: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]],
    inp: Tensor,
    context: Tensor | None,
    *,
    max_rows: int = 2048,
) -> Tensor:
    """``log|det J_b|`` ``[B]`` (float64) of each example's map, ``J_b = d fn(x)_b / d x_b``.

    Row ``c`` of ``J_b`` is the gradient of output element ``c`` of example ``b``. All
    ``B * n`` rows come from one batched call: example ``b`` is repeated ``n`` times and
    copy ``c`` back-propagates only its own element ``c``. This relies on batch
    independence (checked before). Rows are taken ``max_rows`` at a time.
    """
    batch, n = inp.shape[0], inp[0].numel()
    rows = []
    for start in range(0, batch * n, max_rows):
        index = torch.arange(start, min(start + max_rows, batch * n), device=inp.device)
        example, element = index // n, index % n
        copies = inp.detach()[example].clone().requires_grad_(True)
        out, _ = fn(copies, None if context is None else context[example])
        out = out.reshape(len(index), -1)
        if out.shape[1] != n:
            raise ValueError(
                f"an invertible map keeps the number of elements per example: {n} in, "
                f"{out.shape[1]} out"
            )
        picked = out.gather(1, element[:, None]).sum()
        grad = None
        if picked.requires_grad:
            (grad,) = torch.autograd.grad(picked, copies, allow_unused=True)
        rows.append(torch.zeros(len(index), n) if grad is None else grad.reshape(len(index), n))
    jacobian = torch.cat([r.double().cpu() for r in rows]).reshape(batch, n, n)
    return torch.linalg.slogdet(jacobian).logabsdet


def check_logdet_jacobian(
    subject: Subject, direction: str, inp: Tensor, context: Tensor | None, logdet: Tensor
) -> None:
    """The flow's log-det of ``direction`` equals ``log|det J|`` of its per-example map."""
    expected = per_example_log_abs_det(
        lambda t, c: subject.call(direction, t, c, protect=False), inp, context
    )
    sign = "" if direction == "forward" else "^-1"
    what = (
        f"the {direction} log-det differs from log|det J| of the autograd Jacobian of "
        f"f{sign} at the {'input' if direction == 'forward' else 'output'} (sign? a constant? "
        "a missing or averaged term? evaluated at the wrong point?)"
    )
    if torch.isinf(expected).any():
        what += "; the Jacobian is singular for some example (not invertible there)"
    names = (f"flow's {direction} log-det", "log|det J|")
    _compare(f"{direction}_logdet", what, logdet, expected, subject.logdet_tol, names)


def check_logdet_consistency(
    subject: Subject, direction: str, logdet: Tensor, back_logdet: Tensor
) -> None:
    """The log-det at a point is minus the other direction's log-det at its image."""
    other = "inverse" if direction == "forward" else "forward"
    what = (
        f"the {other} log-det at the {direction} map's output is not minus the {direction} "
        "log-det at its input"
    )
    names = (f"{other} log-det", f"-({direction} log-det)")
    _compare("logdet_consistency", what, back_logdet, -logdet, subject.logdet_tol, names)


def _objective(out: Tensor, logdet: Tensor, weights: Tensor) -> Tensor:
    """A scalar that touches every output element and the log-det without cancellation."""
    return (weights * out.double()).sum() + logdet.double().sum()


def _objective_along(
    subject: Subject,
    direction: str,
    inp: Tensor,
    context: Tensor | None,
    weights: Tensor,
    target: Tensor,
    v: Tensor,
    step: float,
) -> float:
    """The objective with ``target`` (a parameter or the input) moved to ``target + step v``;
    ``target`` is restored exactly afterwards.

    The objective is evaluated *before* ``target`` is restored: the flow's output may share
    memory with ``target`` (an identity returning its input as is, a view of a parameter),
    and restoring first would silently move that output back too.
    """
    saved = target.detach().clone()
    with torch.no_grad():
        target.copy_(saved + step * v)
    try:
        out, logdet = subject.call(direction, inp.detach(), context, protect=False)
        return float(_objective(out.detach(), logdet.detach(), weights))
    finally:
        with torch.no_grad():
            target.copy_(saved)


def _close(estimate: float, reference: float, rtol: float = 1e-5) -> bool:
    """``|estimate - reference| <= rtol * (1 + |estimate|)``, the finite-difference test."""
    return abs(estimate - reference) <= rtol * (1 + abs(estimate))


def _slope_mismatch(
    objective_at: Callable[[float], float], slope: float, eps: float, scale: float
) -> tuple[float, float, str] | None:
    """``None`` if the autograd directional derivative ``slope`` of ``t -> objective_at(t)``
    at ``t = 0`` agrees with finite differences; else ``(error, tolerance, details)``.

    The central difference at ``eps`` decides almost always (it is exact for float64
    maths). If it disagrees, second-order one-sided differences on each side and central
    ones are taken at steps ``eps``, ``eps / 2`` and, smaller, ``eps / 64``, ``eps / 128``;
    ``slope`` passes if it agrees with one of them that agrees with the same kind at the
    other step of its pair. On a smooth objective every one of them is the true slope, so a
    wrong gradient (a detached term, a wrong backward) agrees with none, and the estimates
    at ``eps`` and ``eps / 2`` agree with each other. Where they do not (nor the left with
    the right one), the objective has a kink within ``2 eps`` (a ReLU whose input crosses
    zero: it is only piecewise smooth) or is noisy (float32 parts): autograd gives the slope
    of the piece the point is on, which a one-sided or smaller-step difference measures;
    for the noise, the fourth-order difference at step ``1000 eps`` is also accepted to
    ``1e-3`` relative plus ``1e-5 (1 + scale)``.
    """
    values: dict[float, float] = {}

    def at(t: float) -> float:
        if t not in values:
            values[t] = objective_at(t)
        return values[t]

    def central(h: float) -> float:
        return (at(h) - at(-h)) / (2 * h)

    def left(h: float) -> float:
        return (3 * at(0.0) - 4 * at(-h) + at(-2 * h)) / (2 * h)

    def right(h: float) -> float:
        return (-3 * at(0.0) + 4 * at(h) - at(2 * h)) / (2 * h)

    fine = central(eps)
    error, tolerance = abs(fine - slope), 1e-5 * (1 + abs(fine))
    if error <= tolerance:
        return None
    steps = (eps, eps / 2, eps / 64, eps / 128)
    kinds = {"central": central, "left": left, "right": right}
    estimates = {kind: [fn(h) for h in steps] for kind, fn in kinds.items()}
    # An estimate counts where it agrees with the same kind's at half the step: a one-sided
    # difference whose stencil crosses the kink agrees with nothing, not even by chance.
    pairs = [(found[i], found[i + 1]) for found in estimates.values() for i in (0, 2)]
    if any(_close(a, b) and _close(b, slope) for a, b in pairs):
        return None
    smooth = all(_close(found[0], found[1]) for found in estimates.values()) and _close(
        estimates["left"][1], estimates["right"][1]
    )
    big = 1e3 * eps
    details = f"  finite differences: {fine:.10g} (central, step {eps:g})"
    if not smooth:
        coarse = (8 * (at(big) - at(-big)) - (at(2 * big) - at(-2 * big))) / (12 * big)
        coarse_tolerance = 1e-3 * (abs(coarse) + abs(slope)) + 1e-5 * (1 + scale)
        if abs(coarse - slope) <= coarse_tolerance:
            return None
        details += f", {coarse:.10g} (fourth-order, step {big:g})"
    listed = "\n".join(
        f"    {kind:>7}: " + ", ".join(f"{e:.10g}" for e in found)
        for kind, found in estimates.items()
    )
    if smooth:
        details += (
            f"\n  the finite-difference estimates agree with each other at steps {steps[0]:g} "
            f"and {steps[1]:g} (central, left and right: no kink here), not with autograd"
        )
    else:
        details += (
            f"\n  the finite-difference estimates at steps {steps[0]:g} and {steps[1]:g} (or "
            "left and right) disagree with each other: a kink (ReLU, abs, max?) within "
            f"{2 * eps:g} of this point, or float32 rounding; autograd agrees with none of the "
            "one-sided or smaller-step estimates"
        )
    details += f" (steps {', '.join(f'{h:g}' for h in steps)}):\n{listed}\n"
    return error, tolerance, details


def check_gradients(
    subject: Subject,
    x: Tensor,
    y: Tensor,
    context: Tensor | None,
    *,
    seed: int = 0,
    finite_differences: bool = True,
    eps: float = 1e-5,
) -> None:
    """Gradients of ``sum(w * output) + sum(logdet)`` reach the input and every trainable
    parameter, in both directions, and are finite. With ``finite_differences`` (float64
    only), each one's directional derivative along a random unit direction ``v`` agrees with
    ``(L(p + eps v) - L(p - eps v)) / (2 eps)`` to ``1e-5`` relative: this catches a part of
    the graph (such as the log-det) computed from a detached parameter, or a wrong custom
    backward. Near a kink (a ReLU whose input crosses zero within the step) the estimates at
    two step sizes disagree with each other; there autograd may agree instead with a
    one-sided difference (of either side) or a central one at a smaller step, and a failure
    says that a kink was found. For flows with float32 parts (noisy estimates) the
    fourth-order difference at step ``1000 eps`` is accepted to ``1e-3`` relative plus
    ``1e-5 (1 + |L|)``. See ``_slope_mismatch``.
    """
    generator = torch.Generator().manual_seed(seed)
    named = [(n, p) for n, p in subject.module.named_parameters() if p.requires_grad]
    for direction, start in (("forward", x), ("inverse", y)):
        inp = start.detach().clone().requires_grad_(True)
        out, logdet = subject.call(direction, inp, context, protect=False)
        weights = torch.randn(out.shape, generator=generator, dtype=torch.float64)
        weights = weights.to(out.device)
        loss = _objective(out, logdet, weights)
        targets = [("input", inp), *named]
        grads: list[Tensor | None] = [None] * len(targets)
        if loss.requires_grad:
            grads = list(torch.autograd.grad(loss, [t for _, t in targets], allow_unused=True))
        missing = [name for (name, _), g in zip(targets, grads, strict=True) if g is None]
        if missing:
            raise _fail(
                "gradients",
                f"no gradient of {direction}()'s output and log-det reaches "
                f"{', '.join(repr(m) for m in missing)}; expected every trainable parameter "
                "and the input to be in the graph (detached? used under no_grad? unused?)",
            )
        bad = [n for (n, _), g in zip(targets, grads, strict=True) if not torch.isfinite(g).all()]
        if bad:
            raise _fail(
                "gradients", f"non-finite gradients of {direction}() for {bad}", math.inf, 0.0
            )
        if not finite_differences:
            continue
        scale = abs(float(loss.detach()))  # float32 rounding inside the flow is relative to this
        for (name, target), grad in zip(targets, grads, strict=True):
            v = torch.randn(target.shape, generator=generator, dtype=torch.float64)
            v = (v / v.norm().clamp_min(1e-12)).to(target.device, target.dtype)
            autograd_slope = float((grad.double() * v.double()).sum())
            objective_at = partial(
                _objective_along, subject, direction, inp, context, weights, target, v
            )
            mismatch = _slope_mismatch(objective_at, autograd_slope, eps, scale)
            if mismatch is None:
                continue
            error, tolerance, details = mismatch
            raise _fail(
                "gradients",
                f"the autograd gradient of {direction}()'s sum(w * output) + sum(logdet) with "
                f"respect to {name!r} disagrees with finite differences along a random "
                f"direction (a detached term? a wrong custom backward?)\n  largest error "
                f"{error:.3g}, tolerance {tolerance:.3g}\n{details}"
                f"  autograd: {autograd_slope:.10g}\n  (check_flow(..., "
                "finite_differences=False) keeps only the autograd part of this property)",
                error,
                tolerance,
            )


def check_state_dict(
    subject: Subject, fresh: nn.Module, x: Tensor, y: Tensor, context: Tensor | None
) -> None:
    """``fresh.load_state_dict(flow.state_dict())`` makes ``fresh`` compute what the flow
    does, in both directions."""
    fresh.load_state_dict(subject.module.state_dict())
    copy = Subject(
        fresh,
        event_shape=subject.event_shape,
        output_shape=subject.output_shape,
        atol=subject.atol,
        rtol=subject.rtol,
    )
    for direction, inp in (("forward", x), ("inverse", y)):
        what = (
            f"{direction}() of a fresh copy loaded with state_dict() differs from the "
            "original's: some state is not in the state dict (a plain tensor attribute, a "
            "non-persistent buffer, a cache computed at construction?); in"
        )
        _compare_results(
            "state_dict",
            what,
            copy.call(direction, inp, context),
            subject.call(direction, inp, context),
            subject,
            ("fresh copy", "original"),
        )
