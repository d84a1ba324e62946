"""``check_flow``: hypothesis-driven checks of the flow contract on any ``nn.Module``.

The module must follow the contract ``forward(x, context=None) -> (y, logdet [B])`` and
``inverse(y, context=None) -> (x, logdet [B])``, where each log-det is that of the map its
method applies (so ``inverse`` returns ``-log|det J_f|`` at the matching point). See
:mod:`jetblocks.testing.properties` for the maths of each property.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import math
import re
import time
from collections.abc import Callable, Collection, Iterator

import hypothesis
import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis.errors import DidNotReproduce, FailedHealthCheck, Flaky, HypothesisException
from torch import Tensor, nn

from jetblocks.testing import strategies
from jetblocks.testing.perturb import perturb_parameters_
from jetblocks.testing.properties import (
    PROPERTIES,
    FlowCheckError,
    Subject,
    check_batch_independence,
    check_determinism,
    check_finite,
    check_gradients,
    check_logdet_consistency,
    check_logdet_jacobian,
    check_round_trip,
    check_shapes,
    check_state_dict,
)

__all__ = ["DEFAULT_TOLERANCES", "FlowCheckReport", "check_flow", "default_tolerances"]

#: ``(atol, rtol)`` per dtype. Values must satisfy ``|received - expected| <= atol + rtol *
#: |expected|``; log-dets use ``atol * sqrt(n)`` for ``n`` elements per example.
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-8, 1e-6),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}

_BLOB = re.compile(r"@reproduce_failure\('([^']*)', (b'[^']*')\)")


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` that :func:`check_flow` uses for ``dtype`` (see the table there)."""
    if dtype not in DEFAULT_TOLERANCES:
        raise ValueError(
            f"no default tolerances for {dtype}; pass atol and rtol (known dtypes: "
            f"{list(DEFAULT_TOLERANCES)})"
        )
    return DEFAULT_TOLERANCES[dtype]


@dataclasses.dataclass(frozen=True)
class FlowCheckReport:
    """What a passing :func:`check_flow` verified."""

    flow: str
    properties: tuple[str, ...]
    examples: int
    event_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    seconds: float


@contextlib.contextmanager
def _checking(prop: str) -> Iterator[None]:
    """Report any exception raised while checking ``prop`` as a failure of ``prop``."""
    try:
        yield
    except FlowCheckError:
        raise
    except Exception as exc:
        raise FlowCheckError(
            f"the flow raised {type(exc).__name__} while this property was checked: {exc}",
            property=prop,
        ) from exc


def _shape(value: int | Collection[int], name: str) -> tuple[int, ...]:
    shape = (value,) if isinstance(value, int) else tuple(value)
    if not all(isinstance(s, int) and s >= 1 for s in shape):
        raise ValueError(f"{name} must be a tuple of positive ints (no batch dim), got {value!r}")
    return shape


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _cuda_devices(plan: _Plan) -> list[int]:
    """The CUDA device whose RNG to fork as well as the CPU's (the flow's, if on CUDA)."""
    device = plan.device if plan.factory is not None else plan.device or _device_of(plan.flow)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _scramble_state_(module: nn.Module, seed: int) -> None:
    """Overwrite every state-dict entry: floats get N(0, 1) noise added, integer and bool
    tensors have their elements permuted (loading the state dict must undo all of it)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict(keep_vars=True).values():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
                tensor.add_(noise.to(tensor.device, tensor.dtype))
            elif tensor.numel() > 1:
                order = torch.randperm(tensor.numel(), generator=generator).to(tensor.device)
                tensor.copy_(tensor.flatten()[order].view_as(tensor))


def _uniform(shape: tuple[int, ...], bound: strategies.Bounds, generator, dtype) -> Tensor:
    low, high = strategies.bounds_of(bound)
    return (low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)).to(
        dtype
    )


def _first_flow_check_error(error: BaseException) -> FlowCheckError | None:
    if isinstance(error, FlowCheckError):
        return error
    for inner in getattr(error, "exceptions", ()):
        found = _first_flow_check_error(inner)
        if found is not None:
            return found
    return None


def check_flow(
    flow: nn.Module | Callable[[], nn.Module],
    *,
    event_shape: int | tuple[int, ...],
    context_shape: int | tuple[int, ...] | None = None,
    batch_size: int = 3,
    dtype: torch.dtype = torch.float64,
    max_examples: int = 20,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    perturb: bool = True,
    perturb_scale: float = 0.05,
    bound: strategies.Bounds = 3.0,
    output_bound: strategies.Bounds | None = None,
    inverse_inputs: str = "bounded",
    skip: Collection[str] = (),
    device: torch.device | str | None = None,
    reproduce: bytes | str | None = None,
    num_threads: int | None = 1,
    finite_differences: bool = True,
) -> FlowCheckReport:
    """Check that ``flow`` follows the flow contract; raise :class:`FlowCheckError` if not.

    ``flow`` is any ``nn.Module`` with ``forward(x, context=None)`` and ``inverse(y,
    context=None)`` returning ``(output, logdet [B])``, or a zero-argument factory returning
    one (then the ``state_dict`` check loads into a *freshly constructed* instance, which
    also catches state kept outside the state dict). ``event_shape`` and ``context_shape``
    exclude the batch dim; the output's shape is found by calling ``forward`` once, so it
    may differ from the input's (as long as the number of elements is the same).

    On ``max_examples`` hypothesis examples of ``x [B, *event_shape]``, ``y [B,
    *output_shape]`` (each element in ``bound``: ``[-3, 3]`` by default) and contexts, it
    checks in this order: ``shapes``, ``finite``, ``no_input_mutation``, ``determinism``,
    ``batch_independence``, ``round_trip_x`` (``f^-1(f(x)) = x``), ``round_trip_y``
    (``f(f^-1(y)) = y``), ``forward_logdet`` (``= log|det J_f(x)|``, the autograd Jacobian
    of one example's map), ``inverse_logdet`` (``= log|det J_{f^-1}(y)|``) and
    ``logdet_consistency``; then, once, ``gradients`` and ``state_dict``. The earliest
    property in this order that fails on any example is reported, on an example shrunk for
    it. ``skip`` names properties not to check.

    The flow is never modified: it is deep-copied (or built by the factory), cast to
    ``dtype`` and, with ``perturb=True`` (the default), its floating-point parameters get
    ``N(0, perturb_scale^2)`` noise (seeded by ``seed``). Perturbing is the default because
    zero-initialised output layers (as in Jet) make every coupling the identity, where a
    wrong log-det or inverse goes unseen. The mode (``train()``/``eval()``) is kept: put a
    flow with dropout in ``eval()`` first.

    Tolerances: values pass if ``|received - expected| <= atol + rtol * |expected|``;
    log-dets use ``atol * sqrt(n)`` instead of ``atol`` (``n`` = elements per example).
    Defaults by ``dtype``: float64 ``atol=1e-8, rtol=1e-6``; float32 ``1e-4, 1e-4``;
    float16 ``1e-2, 1e-2``; bfloat16 ``5e-2, 5e-2``. The finite-difference part of
    ``gradients`` runs in float64 only: each gradient's directional derivative must agree
    with central differences, or, near a kink such as a ReLU whose input crosses zero within
    the step (the estimates at two step sizes disagree), with a one-sided or smaller-step
    difference. ``finite_differences=False`` turns off only that comparison; ``gradients``
    still checks that finite gradients reach the input and every trainable parameter in both
    directions (use it for flows whose kinks are too dense for any step, or whose
    objective is too noisy; a wrong custom backward then goes unseen).

    ``inverse_inputs="image"`` draws ``y`` as ``f(x')`` for another generated ``x'``
    instead of bounded values (for flows onto a bounded set). Everything is deterministic
    for a given ``seed`` (hypothesis is seeded, without a database, and torch's global RNG
    is forked and seeded), so rerunning reproduces a failure; ``reproduce=<blob>`` (from the
    failure message) replays only the failing example.

    ``num_threads`` sets torch's intra-op threads while checking (restored afterwards):
    the checks run many calls on tiny tensors, which intra-op parallelism only slows down
    (on a 2-core CI runner, 1 thread is ~10x faster). ``None`` leaves it alone.

    Returns a :class:`FlowCheckReport`; raises :class:`FlowCheckError` (an
    ``AssertionError``) naming the property, the largest error and its tolerance, the
    shapes and how to reproduce, also when the flow itself raises during a check.
    """
    __tracebackhide__ = True
    plan = _Plan.validated(
        flow,
        event_shape=event_shape,
        context_shape=context_shape,
        batch_size=batch_size,
        dtype=dtype,
        max_examples=max_examples,
        seed=seed,
        atol=atol,
        rtol=rtol,
        perturb=perturb,
        perturb_scale=perturb_scale,
        bound=bound,
        output_bound=output_bound,
        inverse_inputs=inverse_inputs,
        skip=skip,
        device=device,
        reproduce=reproduce,
        finite_differences=finite_differences,
    )
    threads = torch.get_num_threads()
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        with torch.random.fork_rng(devices=_cuda_devices(plan)):
            torch.manual_seed(seed)
            return _run(plan)
    except FlowCheckError as error:
        raise _finalised(error, plan) from error.__cause__
    finally:
        torch.set_num_threads(threads)


@dataclasses.dataclass
class _Plan:
    """``check_flow``'s validated arguments, and what it learns on the way (the name of
    the flow's class, the output shape)."""

    flow: nn.Module | Callable[[], nn.Module]
    factory: Callable[[], nn.Module] | None
    name: str
    event_shape: tuple[int, ...]
    context_shape: tuple[int, ...] | None
    batch_size: int
    dtype: torch.dtype
    max_examples: int
    seed: int
    atol: float
    rtol: float
    perturb: bool
    perturb_scale: float
    bound: strategies.Bounds
    output_bound: strategies.Bounds | None
    image: bool
    skip: frozenset[str]
    device: torch.device | str | None
    reproduce: bytes | None
    finite_differences: bool
    output_shape: tuple[int, ...] | None = None
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @classmethod
    def validated(
        cls,
        flow,
        *,
        event_shape,
        context_shape,
        batch_size,
        dtype,
        max_examples,
        atol,
        rtol,
        inverse_inputs,
        skip,
        bound,
        reproduce,
        **rest,
    ) -> _Plan:
        """Check the arguments (``ValueError``/``TypeError`` if invalid) and fill defaults."""
        unknown = set(skip) - set(PROPERTIES)
        if unknown:
            raise ValueError(
                f"unknown properties in skip: {sorted(unknown)}; known: {list(PROPERTIES)}"
            )
        if batch_size < 1 or max_examples < 1:
            raise ValueError(
                f"batch_size and max_examples must be >= 1, got {batch_size}, {max_examples}"
            )
        if inverse_inputs not in ("bounded", "image"):
            raise ValueError(f"inverse_inputs must be 'bounded' or 'image', got {inverse_inputs!r}")
        strategies.bounds_of(bound)
        default_atol, default_rtol = (
            default_tolerances(dtype) if atol is None or rtol is None else (atol, rtol)
        )
        factory = None if isinstance(flow, nn.Module) else flow
        if factory is not None and not callable(factory):
            raise TypeError(f"flow must be an nn.Module or a factory returning one, got {flow!r}")
        name = type(flow).__name__
        if factory is not None:
            name = getattr(getattr(factory, "func", factory), "__name__", "the factory's flow")
        return cls(
            flow=flow,
            factory=factory,
            name=name,
            event_shape=_shape(event_shape, "event_shape"),
            context_shape=None if context_shape is None else _shape(context_shape, "context_shape"),
            batch_size=batch_size,
            dtype=dtype,
            max_examples=max_examples,
            atol=default_atol if atol is None else atol,
            rtol=default_rtol if rtol is None else rtol,
            image=inverse_inputs == "image",
            skip=frozenset(skip),
            bound=bound,
            reproduce=reproduce.encode() if isinstance(reproduce, str) else reproduce,
            **rest,
        )

    def build(self, seed: int) -> nn.Module:
        """A private copy of the flow (or a new one from the factory), cast to the dtype and
        device, and perturbed with noise seeded by ``seed``."""
        if self.factory is None:
            module = copy.deepcopy(self.flow)
        else:
            torch.manual_seed(seed)
            module = self.factory()
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"the factory must return an nn.Module, got {type(module).__name__}"
                )
        device = self.device if self.device is not None else _device_of(module)
        module = module.to(device=device, dtype=self.dtype)
        if self.perturb:
            perturb_parameters_(module, scale=self.perturb_scale, seed=seed)
        return module

    def hypothesis_test(self, body: Callable, phases: tuple[Phase, ...]) -> Callable[[], None]:
        """``body`` as a seeded, derandomized hypothesis test over generated examples."""
        examples = strategies.flow_examples(
            self.event_shape,
            self.event_shape if self.image else self.output_shape,
            self.context_shape,
            batch_size=self.batch_size,
            dtype=self.dtype,
            bound=self.bound,
            output_bound=self.bound if self.image else self.output_bound,
        )
        test = settings(
            max_examples=self.max_examples,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            phases=phases,
            report_multiple_bugs=False,
            print_blob=True,
            verbosity=Verbosity.quiet,
        )(given(example=examples)(body))
        test = hypothesis.seed(self.seed)(test)
        if self.reproduce is not None:
            test = hypothesis.reproduce_failure(hypothesis.__version__, self.reproduce)(test)
        return test


def _run(plan: _Plan) -> FlowCheckReport:
    """Build the flow, find its output shape, run the per-example properties under
    hypothesis, then ``gradients`` and ``state_dict`` once on a fixed batch."""
    with _checking("setup"):
        module = plan.build(plan.seed)
    plan.name = type(module).__name__
    device = _device_of(module) if plan.device is None else torch.device(plan.device)
    generator = torch.Generator().manual_seed(plan.seed)

    def fixed(shape: tuple[int, ...], bound: strategies.Bounds) -> Tensor:
        return _uniform((plan.batch_size, *shape), bound, generator, plan.dtype).to(device)

    x0 = fixed(plan.event_shape, plan.bound)
    c0 = None if plan.context_shape is None else fixed(plan.context_shape, plan.bound)
    probe = Subject(
        module,
        event_shape=plan.event_shape,
        output_shape=(),
        atol=plan.atol,
        rtol=plan.rtol,
        check_mutation="no_input_mutation" not in plan.skip,
    )
    with _checking("shapes"):
        plan.output_shape = tuple(probe.call("forward", x0, c0)[0].shape[1:])
    if math.prod(plan.output_shape) != math.prod(plan.event_shape):
        raise FlowCheckError(
            f"forward() maps {math.prod(plan.event_shape)} elements per example "
            f"{list(plan.event_shape)} to {math.prod(plan.output_shape)} "
            f"{list(plan.output_shape)}; an invertible map must keep the number of elements",
            property="shapes",
        )
    subject = Subject(
        module,
        event_shape=plan.event_shape,
        output_shape=plan.output_shape,
        atol=plan.atol,
        rtol=plan.rtol,
        check_mutation="no_input_mutation" not in plan.skip,
    )

    # Pass 1 runs every example and records which properties fail; pass 2 replays the same
    # examples raising only for the earliest failing property in the documented order, so
    # that hypothesis shrinks an example of that property (and gives its blob) rather than
    # one of whichever property an early example happened to break. A replayed blob
    # (``reproduce``) runs once and raises whatever fails.
    failures: dict[str, FlowCheckError] = {}
    state: dict = {"target": "any" if plan.reproduce is not None else None, "ran": 0}

    def body(example: strategies.FlowExample) -> None:
        if state["target"] in (None, "any"):
            state["ran"] += 1
        try:
            _check_example(subject, example, plan.skip, plan.image, device)
        except FlowCheckError as error:
            if state["target"] is None:
                failures.setdefault(error.property, error)
            elif state["target"] in ("any", error.property):
                raise

    shrinking = (Phase.explicit, Phase.generate, Phase.shrink)
    first = shrinking if plan.reproduce is not None else (Phase.explicit, Phase.generate)
    _run_hypothesis(lambda: plan.hypothesis_test(body, first), plan.reproduce is not None)
    if failures:
        state["target"] = min(failures, key=list(PROPERTIES).index)
        _run_hypothesis(lambda: plan.hypothesis_test(body, shrinking), replaying=False)
        error = failures[state["target"]]
        error.args = (
            f"{error.args[0]}\n  (flaky: this failure did not reappear when the same "
            "examples were replayed: the flow depends on hidden state or randomness)",
        )
        raise error

    y0 = fixed(plan.output_shape, plan.bound if plan.output_bound is None else plan.output_bound)
    if plan.image:
        with _checking("shapes"):
            y0 = subject.call("forward", fixed(plan.event_shape, plan.bound), c0)[0].detach()
    if "gradients" not in plan.skip:
        with _checking("gradients"):
            check_gradients(
                subject,
                x0,
                y0,
                c0,
                seed=plan.seed,
                finite_differences=plan.finite_differences and plan.dtype == torch.float64,
            )
    if "state_dict" not in plan.skip:
        with _checking("state_dict"):
            if plan.factory is not None:
                fresh = plan.build(plan.seed + 1)
            else:
                fresh = copy.deepcopy(module)
                _scramble_state_(fresh, plan.seed + 1)
            check_state_dict(subject, fresh, x0, y0, c0)
    return FlowCheckReport(
        flow=plan.name,
        properties=tuple(p for p in PROPERTIES if p not in plan.skip and p != "setup"),
        examples=state["ran"],
        event_shape=plan.event_shape,
        output_shape=plan.output_shape,
        seconds=time.perf_counter() - plan.started,
    )


def _run_hypothesis(build: Callable[[], Callable[[], None]], replaying: bool) -> None:
    """Build and run a hypothesis test; let only :class:`FlowCheckError` out."""
    try:
        build()()
    except FlowCheckError as error:
        error.blob = _blob_of(error)
        raise
    except DidNotReproduce:
        if not replaying:
            raise
    except Flaky as error:
        found = _first_flow_check_error(error)
        detail = (
            "the failure did not reproduce when hypothesis replayed the same example: the "
            "flow's results depend on hidden state or randomness"
        )
        if found is None:
            raise FlowCheckError(f"{detail} ({error})", property="determinism") from error
        found.args = (f"{found.args[0]}\n  (flaky: {detail})",)
        found.blob = _blob_of(found)
        raise found from found.__cause__
    except HypothesisException as error:
        hint = ""
        if isinstance(error, FailedHealthCheck) and "nested_given" in str(error):
            hint = (
                "; check_flow was called inside a hypothesis test: add "
                "@settings(suppress_health_check=[HealthCheck.nested_given]) to that test"
            )
        raise FlowCheckError(
            f"hypothesis could not run the checks: {type(error).__name__}: {error}{hint}",
            property="setup",
        ) from error
    except Exception as error:  # an exception group, should hypothesis report several bugs
        found = _first_flow_check_error(error)
        if found is None:
            raise
        found.blob = _blob_of(found)
        raise found from found.__cause__


def _blob_of(error: BaseException) -> bytes | None:
    for note in getattr(error, "__notes__", ()):
        match = _BLOB.search(note)
        if match:
            return ast.literal_eval(match.group(2))
    return None


def _check_example(
    subject: Subject,
    example: strategies.FlowExample,
    skip: Collection[str],
    image: bool,
    device: torch.device,
) -> None:
    """Every per-example property, in the documented order, on one generated example."""
    x = example.x.to(device)
    context = None if example.context is None else example.context.to(device)
    with _checking("shapes"):
        out, logdet = subject.call("forward", x, context)
        if "shapes" not in skip:
            check_shapes(subject, "forward", x, out, logdet)
        y = (
            subject.call("forward", example.y.to(device), context)[0].detach()
            if image
            else (example.y.to(device))
        )
        x_of_y, logdet_y = subject.call("inverse", y, context)
        if "shapes" not in skip:
            check_shapes(subject, "inverse", y, x_of_y, logdet_y)
    if "finite" not in skip:
        check_finite("forward", out, logdet)
        check_finite("inverse", x_of_y, logdet_y)
    runs = {
        "forward": (x, out, logdet),
        "inverse": (y, x_of_y, logdet_y),
    }
    for prop, check in (
        ("determinism", check_determinism),
        ("batch_independence", check_batch_independence),
    ):
        if prop in skip:
            continue
        with _checking(prop):
            for direction, (inp, result, result_logdet) in runs.items():
                check(subject, direction, inp, context, result, result_logdet)
    back = {}
    for which, start, there in (("x", x, out), ("y", y, x_of_y)):
        with _checking(f"round_trip_{which}"):
            if f"round_trip_{which}" in skip:
                back[which] = subject.call("inverse" if which == "x" else "forward", there, context)
            else:
                back[which] = check_round_trip(subject, which, start, context, there)
    for direction, (inp, _, result_logdet) in runs.items():
        prop = f"{direction}_logdet"
        if prop not in skip:
            with _checking(prop):
                check_logdet_jacobian(subject, direction, inp, context, result_logdet)
    if "logdet_consistency" not in skip:
        check_logdet_consistency(subject, "forward", logdet, back["x"][1])
        check_logdet_consistency(subject, "inverse", logdet_y, back["y"][1])


def _finalised(error: FlowCheckError, plan: _Plan) -> FlowCheckError:
    """The error with the flow, the property, the shapes and how to reproduce spelled out."""
    prop, batch = error.property, plan.batch_size
    output = "(not known yet)" if plan.output_shape is None else [batch, *plan.output_shape]
    context = "None" if plan.context_shape is None else [batch, *plan.context_shape]
    shapes = (
        f"x {[batch, *plan.event_shape]} -> y {output}, log-det [{batch}], context {context}; "
        f"dtype {plan.dtype}"
    )
    if prop == "shapes":  # what the flow returned is in the detail; these are the contract's
        shapes = (
            f"expected x {[batch, *plan.event_shape]} -> y {output}, log-det [B]=[{batch}], "
            f"context {context}; dtype {plan.dtype}"
        )
    parameters = (
        f"perturbed by N(0, {plan.perturb_scale}^2) noise, seed {plan.seed}"
        if plan.perturb
        else "as given (perturb=False)"
    )
    reproduce = (
        "check_flow is deterministic: rerun it with the same arguments (same seed) to see "
        "this failure again"
    )
    if error.blob is not None:
        reproduce += (
            f"; to replay only the failing example, pass reproduce={error.blob!r} (hypothesis "
            f"{hypothesis.__version__} @reproduce_failure blob)"
        )
    message = (
        f"{plan.name} fails property {prop!r} of the flow contract: {PROPERTIES[prop]}\n"
        f"  {error.args[0]}\n  shapes: {shapes}\n  parameters: {parameters}\n"
        f"  to reproduce: {reproduce}"
    )
    return FlowCheckError(
        message, property=prop, error=error.error, tolerance=error.tolerance, blob=error.blob
    )
