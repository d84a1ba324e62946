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
from functools import partial
from typing import Any, NamedTuple, NoReturn

import hypothesis
import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis.errors import DidNotReproduce, FailedHealthCheck, Flaky, HypothesisException
from hypothesis.strategies import SearchStrategy
from torch import Tensor, nn

from jetblocks.testing import strategies
from jetblocks.testing.options import CheckOptions
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
from jetblocks.testing.strategies import FlowExample

__all__ = ["FlowCheckReport", "check_flow"]

_BLOB = re.compile(r"@reproduce_failure\('([^']*)', (b'[^']*')\)")
_GENERATE = (Phase.explicit, Phase.generate)
_GENERATE_AND_SHRINK = (Phase.explicit, Phase.generate, Phase.shrink)


@dataclasses.dataclass(frozen=True)
class FlowCheckReport:
    """What a passing :func:`check_flow` verified."""

    flow: str
    properties: tuple[str, ...]
    examples: int
    event_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    seconds: float


def check_flow(
    flow: nn.Module | Callable[[], nn.Module],
    *,
    event_shape: int | tuple[int, ...],
    context_shape: int | tuple[int, ...] | None = None,
    options: CheckOptions | None = None,
    **overrides: Any,
) -> FlowCheckReport:
    """Check that ``flow`` follows the flow contract; raise :class:`FlowCheckError` if not.

    ``flow`` is any ``nn.Module`` with ``forward(x, context=None)`` and ``inverse(y,
    context=None)`` returning ``(output, logdet [B])``, or a zero-argument factory returning
    one (then the ``state_dict`` check loads into a *freshly constructed* instance, which
    also catches state kept outside the state dict). ``event_shape`` and ``context_shape``
    exclude the batch dim; the output's shape is found by calling ``forward`` once, so it
    may differ from the input's (as long as the number of elements is the same).

    Each setting named below is a field of :class:`CheckOptions`: pass one as ``options``,
    or any setting as a keyword (keywords override ``options``; an unknown one is a
    ``TypeError``). ``check_flow(flow, event_shape=(8,), dtype=torch.float32)`` equals
    ``check_flow(flow, event_shape=(8,), options=CheckOptions(dtype=torch.float32))``.

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
    options = CheckOptions.resolve(options, overrides)
    spec = _FlowSpec.of(flow, event_shape, context_shape)
    started = time.perf_counter()
    with _torch_isolated(options, _cuda_devices(spec, options)):
        with _reported(spec.name, spec, options), _checking("setup"):
            module = spec.build(options, seed=options.seed)
        name = type(module).__name__
        with _reported(name, spec, options):
            subject, fixed = _prepare(module, spec, options)
        with _reported(name, spec, options, subject.output_shape):
            _check_element_count(spec.event_shape, subject.output_shape)
            examples = _check_examples(subject, spec, options, _device(module, options))
            _check_once(subject, spec, options, fixed)
    return FlowCheckReport(
        flow=name,
        properties=tuple(p for p in PROPERTIES if p not in options.skip and p != "setup"),
        examples=examples,
        event_shape=spec.event_shape,
        output_shape=subject.output_shape,
        seconds=time.perf_counter() - started,
    )


# -- what is checked, and how it is set up ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _FlowSpec:
    """The flow to check (a module, or a factory building one) and its shapes."""

    flow: nn.Module | Callable[[], nn.Module]
    name: str
    event_shape: tuple[int, ...]
    context_shape: tuple[int, ...] | None

    @classmethod
    def of(
        cls,
        flow: nn.Module | Callable[[], nn.Module],
        event_shape: int | Collection[int],
        context_shape: int | Collection[int] | None,
    ) -> _FlowSpec:
        """Validate ``check_flow``'s arguments (``ValueError``/``TypeError`` if invalid)."""
        if not isinstance(flow, nn.Module) and not callable(flow):
            raise TypeError(f"flow must be an nn.Module or a factory returning one, got {flow!r}")
        name = type(flow).__name__
        if not isinstance(flow, nn.Module):
            name = getattr(getattr(flow, "func", flow), "__name__", "the factory's flow")
        return cls(
            flow=flow,
            name=name,
            event_shape=_shape(event_shape, "event_shape"),
            context_shape=None if context_shape is None else _shape(context_shape, "context_shape"),
        )

    @property
    def is_factory(self) -> bool:
        return not isinstance(self.flow, nn.Module)

    def build(self, options: CheckOptions, seed: int) -> nn.Module:
        """A private copy of the flow (or a new one from the factory), cast to the dtype and
        device, and perturbed with noise seeded by ``seed``."""
        if self.is_factory:
            torch.manual_seed(seed)
            module = self.flow()
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"the factory must return an nn.Module, got {type(module).__name__}"
                )
        else:
            module = copy.deepcopy(self.flow)
        module = module.to(device=_device(module, options), dtype=options.dtype)
        if options.perturb:
            perturb_parameters_(module, scale=options.perturb_scale, seed=seed)
        return module


def _shape(value: int | Collection[int], name: str) -> tuple[int, ...]:
    shape = (value,) if isinstance(value, int) else tuple(value)
    if not all(isinstance(s, int) and s >= 1 for s in shape):
        raise ValueError(f"{name} must be a tuple of positive ints (no batch dim), got {value!r}")
    return shape


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _device(module: nn.Module, options: CheckOptions) -> torch.device:
    """The device to check on: ``options.device``, else the module's."""
    return _device_of(module) if options.device is None else torch.device(options.device)


def _cuda_devices(spec: _FlowSpec, options: CheckOptions) -> list[int]:
    """The CUDA device whose RNG to fork as well as the CPU's (the flow's, if on CUDA)."""
    device = options.device
    if device is None and not spec.is_factory:
        device = _device_of(spec.flow)
    device = torch.device("cpu" if device is None else device)
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextlib.contextmanager
def _torch_isolated(options: CheckOptions, cuda_devices: list[int]) -> Iterator[None]:
    """Fork torch's RNGs, seeded with ``seed``, and use ``num_threads`` intra-op threads;
    restore both afterwards."""
    threads = torch.get_num_threads()
    try:
        if options.num_threads is not None:
            torch.set_num_threads(options.num_threads)
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(options.seed)
            yield
    finally:
        torch.set_num_threads(threads)


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


class _FixedBatch(NamedTuple):
    """A batch drawn once from ``seed``: ``gradients`` and ``state_dict`` run on it."""

    x: Tensor
    y: Tensor
    context: Tensor | None


def _subject(
    module: nn.Module, spec: _FlowSpec, options: CheckOptions, output_shape: tuple[int, ...]
) -> Subject:
    atol, rtol = options.tolerances
    return Subject(
        module,
        event_shape=spec.event_shape,
        output_shape=output_shape,
        atol=atol,
        rtol=rtol,
        check_mutation="no_input_mutation" not in options.skip,
    )


def _uniform(shape: tuple[int, ...], bound: strategies.Bounds, generator, dtype) -> Tensor:
    low, high = strategies.bounds_of(bound)
    return (low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)).to(
        dtype
    )


def _prepare(
    module: nn.Module, spec: _FlowSpec, options: CheckOptions
) -> tuple[Subject, _FixedBatch]:
    """Find the output shape by calling ``forward`` on the fixed batch; return the subject
    and the fixed batch (its ``y`` bounded, or the image of another drawn ``x``)."""
    generator = torch.Generator().manual_seed(options.seed)
    device = _device(module, options)

    def draw(shape: tuple[int, ...], bound: strategies.Bounds) -> Tensor:
        return _uniform((options.batch_size, *shape), bound, generator, options.dtype).to(device)

    x = draw(spec.event_shape, options.bound)
    context = None if spec.context_shape is None else draw(spec.context_shape, options.bound)
    with _checking("shapes"):
        out = _subject(module, spec, options, ()).call("forward", x, context)[0]
    subject = _subject(module, spec, options, tuple(out.shape[1:]))
    if not options.image:
        return subject, _FixedBatch(x, draw(subject.output_shape, options.output_bounds), context)
    with _checking("shapes"):
        y = subject.call("forward", draw(spec.event_shape, options.bound), context)[0].detach()
    return subject, _FixedBatch(x, y, context)


def _check_element_count(event_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> None:
    if math.prod(output_shape) != math.prod(event_shape):
        raise FlowCheckError(
            f"forward() maps {math.prod(event_shape)} elements per example "
            f"{list(event_shape)} to {math.prod(output_shape)} "
            f"{list(output_shape)}; an invertible map must keep the number of elements",
            property="shapes",
        )


# -- the per-example properties, under hypothesis ------------------------------------------


def _check_examples(
    subject: Subject, spec: _FlowSpec, options: CheckOptions, device: torch.device
) -> int:
    """Run the per-example properties on hypothesis's examples; return how many ran.

    A first pass runs every example and notes the first failure of each property; a second
    replays the same examples raising only the earliest failing property in the documented
    order, so that hypothesis shrinks an example of that property (and gives its blob)
    rather than one of whichever property an early example happened to break. A
    ``reproduce`` blob's example runs once and raises whatever fails.
    """
    run = partial(
        _run_examples, strategy=_example_strategy(spec, options, subject), options=options
    )
    check = partial(_check_example, subject, skip=options.skip, image=options.image, device=device)
    if options.reproduce is not None:
        return run(check, _GENERATE_AND_SHRINK)
    ran, failures = _survey(run, check)
    if failures:
        _shrink_earliest(run, check, failures)
    return ran


def _example_strategy(
    spec: _FlowSpec, options: CheckOptions, subject: Subject
) -> SearchStrategy[FlowExample]:
    return strategies.flow_examples(
        spec.event_shape,
        spec.event_shape if options.image else subject.output_shape,
        spec.context_shape,
        batch_size=options.batch_size,
        dtype=options.dtype,
        bound=options.bound,
        output_bound=options.bound if options.image else options.output_bound,
    )


def _survey(
    run: Callable[..., int], check: Callable[[FlowExample], None]
) -> tuple[int, dict[str, FlowCheckError]]:
    """Run ``check`` on every example without stopping; return how many ran and the first
    failure of each property."""
    failures: dict[str, FlowCheckError] = {}

    def record(example: FlowExample) -> None:
        try:
            check(example)
        except FlowCheckError as error:
            failures.setdefault(error.property, error)

    ran = run(record, _GENERATE)
    return ran, failures


def _shrink_earliest(
    run: Callable[..., int],
    check: Callable[[FlowExample], None],
    failures: dict[str, FlowCheckError],
) -> NoReturn:
    """Replay the examples raising only the earliest failing property's failures, shrunk;
    if none reappears, raise its first failure as flaky."""
    earliest = min(failures, key=list(PROPERTIES).index)

    def only_earliest(example: FlowExample) -> None:
        try:
            check(example)
        except FlowCheckError as error:
            if error.property == earliest:
                raise

    run(only_earliest, _GENERATE_AND_SHRINK)
    raise _flaky(
        failures[earliest],
        "this failure did not reappear when the same examples were replayed: the flow "
        "depends on hidden state or randomness",
    )


def _run_examples(
    body: Callable[[FlowExample], None],
    phases: tuple[Phase, ...],
    *,
    strategy: SearchStrategy[FlowExample],
    options: CheckOptions,
) -> int:
    """Run ``body`` as a seeded, derandomized hypothesis test in ``phases`` (on the
    ``reproduce`` blob's example only, if one is given); return how many examples it ran
    on. Only :class:`FlowCheckError` gets out."""
    ran = 0

    def counted(example: FlowExample) -> None:
        nonlocal ran
        ran += 1
        body(example)

    try:
        _hypothesis_test(counted, phases, strategy, options)()
    except FlowCheckError as error:
        error.blob = _blob_of(error)
        raise
    except DidNotReproduce:
        pass  # the blob's example passes now: nothing to report
    except Flaky as error:
        found = _first_flow_check_error(error)
        detail = (
            "the failure did not reproduce when hypothesis replayed the same example: the "
            "flow's results depend on hidden state or randomness"
        )
        if found is None:
            raise FlowCheckError(f"{detail} ({error})", property="determinism") from error
        found = _flaky(found, detail)
        found.blob = _blob_of(found)
        raise found from found.__cause__
    except HypothesisException as error:
        raise _hypothesis_failed(error) from error
    except Exception as error:  # an exception group, should hypothesis report several bugs
        found = _first_flow_check_error(error)
        if found is None:
            raise
        found.blob = _blob_of(found)
        raise found from found.__cause__
    return ran


def _hypothesis_test(
    body: Callable[[FlowExample], None],
    phases: tuple[Phase, ...],
    strategy: SearchStrategy[FlowExample],
    options: CheckOptions,
) -> Callable[[], None]:
    test = settings(
        max_examples=options.max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=phases,
        report_multiple_bugs=False,
        print_blob=True,
        verbosity=Verbosity.quiet,
    )(given(example=strategy)(body))
    test = hypothesis.seed(options.seed)(test)
    if options.reproduce is not None:
        test = hypothesis.reproduce_failure(hypothesis.__version__, options.reproduce)(test)
    return test


def _flaky(error: FlowCheckError, detail: str) -> FlowCheckError:
    """``error`` with ``detail`` (why it is flaky) added to its message."""
    error.args = (f"{error.args[0]}\n  (flaky: {detail})",)
    return error


def _hypothesis_failed(error: HypothesisException) -> FlowCheckError:
    hint = ""
    if isinstance(error, FailedHealthCheck) and "nested_given" in str(error):
        hint = (
            "; check_flow was called inside a hypothesis test: add "
            "@settings(suppress_health_check=[HealthCheck.nested_given]) to that test"
        )
    return FlowCheckError(
        f"hypothesis could not run the checks: {type(error).__name__}: {error}{hint}",
        property="setup",
    )


def _first_flow_check_error(error: BaseException) -> FlowCheckError | None:
    if isinstance(error, FlowCheckError):
        return error
    for inner in getattr(error, "exceptions", ()):
        found = _first_flow_check_error(inner)
        if found is not None:
            return found
    return None


def _blob_of(error: BaseException) -> bytes | None:
    for note in getattr(error, "__notes__", ()):
        match = _BLOB.search(note)
        if match:
            return ast.literal_eval(match.group(2))
    return None


def _check_example(
    subject: Subject,
    example: FlowExample,
    *,
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
        y = example.y.to(device)
        if image:
            y = subject.call("forward", y, context)[0].detach()
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


# -- once per check: gradients and the state dict ------------------------------------------


def _check_once(
    subject: Subject, spec: _FlowSpec, options: CheckOptions, fixed: _FixedBatch
) -> None:
    """``gradients`` and ``state_dict``, each once, on the fixed batch."""
    if "gradients" not in options.skip:
        with _checking("gradients"):
            check_gradients(
                subject,
                *fixed,
                seed=options.seed,
                finite_differences=options.finite_differences and options.dtype == torch.float64,
            )
    if "state_dict" not in options.skip:
        with _checking("state_dict"):
            check_state_dict(subject, _fresh(subject.module, spec, options), *fixed)


def _fresh(module: nn.Module, spec: _FlowSpec, options: CheckOptions) -> nn.Module:
    """A module to load the state dict into: a new one from the factory, else a copy whose
    state is scrambled."""
    if spec.is_factory:
        return spec.build(options, seed=options.seed + 1)
    fresh = copy.deepcopy(module)
    _scramble_state_(fresh, options.seed + 1)
    return fresh


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


# -- the failure report ----------------------------------------------------------------------


@contextlib.contextmanager
def _reported(
    name: str,
    spec: _FlowSpec,
    options: CheckOptions,
    output_shape: tuple[int, ...] | None = None,
) -> Iterator[None]:
    """Re-raise a :class:`FlowCheckError` with the flow, the property, the shapes and how
    to reproduce spelled out."""
    try:
        yield
    except FlowCheckError as error:
        raise _finalised(error, name, spec, options, output_shape) from error.__cause__


def _finalised(
    error: FlowCheckError,
    name: str,
    spec: _FlowSpec,
    options: CheckOptions,
    output_shape: tuple[int, ...] | None,
) -> FlowCheckError:
    prop, batch = error.property, options.batch_size
    output = "(not known yet)" if output_shape is None else [batch, *output_shape]
    context = "None" if spec.context_shape is None else [batch, *spec.context_shape]
    shapes = (
        f"x {[batch, *spec.event_shape]} -> y {output}, log-det [{batch}], context {context}; "
        f"dtype {options.dtype}"
    )
    if prop == "shapes":  # what the flow returned is in the detail; these are the contract's
        shapes = (
            f"expected x {[batch, *spec.event_shape]} -> y {output}, log-det [B]=[{batch}], "
            f"context {context}; dtype {options.dtype}"
        )
    parameters = (
        f"perturbed by N(0, {options.perturb_scale}^2) noise, seed {options.seed}"
        if options.perturb
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
        f"{name} fails property {prop!r} of the flow contract: {PROPERTIES[prop]}\n"
        f"  {error.args[0]}\n  shapes: {shapes}\n  parameters: {parameters}\n"
        f"  to reproduce: {reproduce}"
    )
    return FlowCheckError(
        message, property=prop, error=error.error, tolerance=error.tolerance, blob=error.blob
    )
