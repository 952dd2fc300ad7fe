"""The one place where a DSPy program is run over a list of examples.

Valset scoring and trace collection both go through `ProgramRunner.run`; under several ranks each rank runs a share
of the examples and every rank gets all the results (see `core/ranks.py`). Runtime faults of single calls — an
output the adapter cannot parse, a metric that raises, any other program error — are caught per example, counted by
kind, and never stop the run; a metric whose value is not a score (`MetricValueError`) stops it at once.
"""

from __future__ import annotations

import functools
import logging
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback
from dspy.utils.exceptions import AdapterParseError

from bt_trl.core.interrupts import raise_if_interrupted
from bt_trl.core.ranks import Ranks
from bt_trl.core.threads import map_in_threads
from bt_trl.serving.structured import structured_adapter

logger = logging.getLogger(__name__)

Metric = Callable[..., Any]


@dataclass
class ProgramCall:
    """One program call: its prediction, the module calls it made, and the metric's verdict."""

    example: dspy.Example
    prediction: dspy.Prediction | None = None
    trace: list = field(default_factory=list)  # DSPy trace entries: (predictor, inputs, outputs)
    score: float = 0.0
    metric_value: float | None = None  # the metric's value as a number, before `metric_threshold`
    error: str | None = None  # None, "parse", "metric" or "program"
    # Traced with error "parse": what the failing module wrote. Its call ends the trace, with empty outputs.
    unparsed_output: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and self.score > 0

    def portable(self, program: dspy.Module) -> ProgramCall:
        """A copy that can be sent to another rank. Predictors and predictions refer to dynamically created
        signature classes, which do not pickle: the trace names each predictor by its name in `program`, and
        predictions keep their fields only."""
        names = {id(predictor): name for name, predictor in program.named_predictors()}
        try:
            trace = [(names[id(predictor)], inputs, _fields(outputs)) for predictor, inputs, outputs in self.trace]
        except KeyError:
            raise ValueError("the program called a predictor that is not one of its named_predictors(); every module "
                             "call must go through a predictor attribute of the program") from None
        prediction = None if self.prediction is None else _fields(self.prediction)
        return replace(self, prediction=prediction, trace=trace)

    def restored(self, program: dspy.Module) -> ProgramCall:
        """The inverse of `portable`, on a rank holding the same program."""
        predictors = dict(program.named_predictors())
        return replace(self, trace=[(predictors[name], inputs, outputs) for name, inputs, outputs in self.trace])


def _fields(prediction: dspy.Prediction) -> dspy.Prediction:
    return dspy.Prediction(**prediction.toDict())


@dataclass
class RunSummary:
    total: int
    passed: int
    score: float  # mean metric score, in percent (as DSPy's Evaluate reports it)
    parse_failures: int
    metric_errors: int
    program_errors: int

    @classmethod
    def of(cls, calls: list[ProgramCall]) -> RunSummary:
        errors = [c.error for c in calls]
        return cls(
            total=len(calls),
            passed=sum(c.passed for c in calls),
            score=100.0 * sum(c.score for c in calls) / max(len(calls), 1),
            parse_failures=errors.count("parse"),
            metric_errors=errors.count("metric"),
            program_errors=errors.count("program"),
        )


def default_adapter() -> dspy.Adapter:
    """DSPy's ChatAdapter without its JSON fallback, so that an unparseable answer costs no second LM call in a format
    the w step does not train on."""
    return dspy.ChatAdapter(use_json_adapter_fallback=False)


def configured_adapter() -> dspy.Adapter:
    """The user's configured adapter (`dspy.configure(adapter=...)`), else `default_adapter()`."""
    return dspy.settings.adapter or default_adapter()


def program_adapter() -> dspy.Adapter:
    """The adapter programs run with: `configured_adapter()`, asking for structured outputs
    (`structured.structured_adapter`), which the LM's engine honours when structured generation is on."""
    return structured_adapter(configured_adapter())


class ModuleParseError(AdapterParseError):
    """A module of a served program (`served_program`) wrote an output its adapter cannot parse. The message names
    the module (its name in the program, as in `named_predictors()`) and the fields; it is an `AdapterParseError`,
    so code written for DSPy's convention catches it as before."""

    def __init__(self, modules: list[str], fields: list[str], cause: AdapterParseError):
        self.modules, self.fields = modules, fields
        where = " or ".join(repr(m) for m in modules) if modules else "(a module outside the program's predictors)"
        super().__init__(
            adapter_name=cause.adapter_name, signature=cause.signature, lm_response=cause.lm_response,
            parsed_result=cause.parsed_result,
            message=f"module {where}: no parseable value for output field(s) {', '.join(map(repr, fields))}",
        )


def module_parse_error(program: dspy.Module, error: AdapterParseError) -> ModuleParseError:
    """`error` (raised by a call of one of `program`'s modules) naming that module and the fields it lacks."""
    if isinstance(error, ModuleParseError):
        return error
    # The adapter reports the signature it parsed with, the predictor's own (predictors of one program hold distinct
    # signature classes unless the user gave two the same class: then both are named).
    modules = [name for name, predictor in program.named_predictors() if predictor.signature is error.signature]
    expected = list(error.signature.output_fields)
    if error.parsed_result is not None:  # fields missing from the output
        fields = [name for name in expected if name not in error.parsed_result]
    else:  # a field whose value does not parse as its type (DSPy names it in its message)
        named = re.search(r"Failed to parse field (\w+)", error.message or "")
        fields = [named.group(1)] if named else expected
    return ModuleParseError(modules, fields, error)


class ServedProgram:
    """Mixin of `served_program`: every call runs under the adapter the steps used; `close()` (or leaving
    `with program:`) stops the workers of its LMs' engines (a later call starts them again)."""

    _served_adapter: dspy.Adapter

    def close(self) -> None:
        for lm in {id(p.lm): p.lm for p in self.predictors() if p.lm is not None}.values():
            engine = getattr(lm, "engine", None)
            if engine is not None:
                engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __call__(self, *args, **kwargs):
        with dspy.context(adapter=self._served_adapter):
            try:
                return super().__call__(*args, **kwargs)
            except AdapterParseError as error:
                raise module_parse_error(self, error) from error

    async def acall(self, *args, **kwargs):
        with dspy.context(adapter=self._served_adapter):
            try:
                return await super().acall(*args, **kwargs)
            except AdapterParseError as error:
                raise module_parse_error(self, error) from error


@functools.cache
def _served_class(cls: type) -> type:
    return type(f"Served{cls.__name__}", (ServedProgram, cls), {"__module__": cls.__module__})


def served_program(program: dspy.Module, lm: dspy.LM, adapter: dspy.Adapter) -> dspy.Module:
    """A copy of `program` that behaves as it did in the steps wherever it is called: every module on `lm` (which
    carries the steps' generation settings) and every call under `adapter` (the steps' `program_adapter()`, with its
    structured outputs), whatever `dspy.settings` hold. An output that cannot be parsed raises `ModuleParseError`
    (an `AdapterParseError`) naming the module and field, after one LM call: no fallback to another format."""
    served = program.deepcopy()
    served.set_lm(lm)
    served.__class__ = _served_class(next(c for c in type(program).__mro__ if not issubclass(c, ServedProgram)))
    served._served_adapter = adapter
    return served


class MetricValueError(TypeError):
    """A metric returned something that is not a score. Not one call's fault to count and survive: every call would
    return the same kind of value, so it stops the run at the first."""


def metric_number(value) -> float:
    """A metric's return value as a number: a bool, an int, a float (numpy's too) or `dspy.Prediction(score=...)`,
    as DSPy's optimizers take them. Anything else (a string such as "yes", None) raises `MetricValueError`."""
    if isinstance(value, dspy.Prediction) and "score" in value:
        value = value.score
    if isinstance(value, numbers.Real) or (hasattr(value, "__float__")
                                           and not isinstance(value, (str, bytes, dspy.Prediction))):
        return float(value)
    raise MetricValueError(
        f"the metric returned {value!r} ({type(value).__name__}); a metric must return a bool, a number or "
        "dspy.Prediction(score=<number>), e.g. `return prediction.answer == example.answer`"
    )


def checked_metric(metric: Metric) -> Metric:
    """`metric` raising `MetricValueError` on a value that is not a score, wherever it is called (DSPy's optimizers
    take the value as it is: a string "no" would pass as truthy)."""

    @functools.wraps(metric)
    def checked(example, prediction, trace=None):
        value = metric(example, prediction, trace)
        metric_number(value)
        return value

    return checked


def metric_score(value, threshold: float | None) -> float:
    """A metric's return value as a score in [0, 1]; with a threshold, pass (1) or fail (0) as in DSPy."""
    score = metric_number(value)
    if threshold is not None:
        return float(score >= threshold)
    return score


def passes(value, threshold: float | None) -> bool:
    """The pass rule: whether a metric's return value makes a run pass (its trace kept, a demo bootstrapped)."""
    return metric_score(value, threshold) > 0


class _FailedPredictorCall(BaseCallback):
    """Remembers, during one program call, the last predictor call whose output did not parse, with its inputs: DSPy
    traces only the calls that returned."""

    def __init__(self):
        self._started: dict[str, tuple[dspy.Predict, dict]] = {}
        self.call: tuple[dspy.Predict, dict] | None = None

    def on_module_start(self, call_id: str, instance, inputs: dict) -> None:
        if isinstance(instance, dspy.Predict):
            fields = instance.signature.input_fields
            self._started[call_id] = (instance, {k: v for k, v in inputs["kwargs"].items() if k in fields})

    def on_module_end(self, call_id: str, outputs, exception: BaseException | None = None) -> None:
        started = self._started.pop(call_id, None)
        if started is not None and isinstance(exception, AdapterParseError):
            self.call = started


class ProgramRunner:
    """Runs a program over examples with `num_threads` concurrent calls (which the LM engine batches). With `ranks`
    spanning several processes, each runs its share of the examples (every rank must call `run` together)."""

    def __init__(self, metric: Metric, num_threads: int = 8, metric_threshold: float | None = None,
                 ranks: Ranks | None = None):
        self.metric = metric
        self.num_threads = num_threads
        self.metric_threshold = metric_threshold
        self.ranks = ranks
        self.local_calls = 0  # program calls made by this process

    def run(self, program: dspy.Module, examples: list[dspy.Example], lm: dspy.LM | Sequence[dspy.LM],
            with_trace: bool = False) -> list[ProgramCall]:
        """Calls `program` on every example with `lm` (or with `lm[i]` on `examples[i]`). With `with_trace`, records
        the module calls of each run and scores it with `metric(example, prediction, trace)` — the DSPy convention for
        "does this trace pass"; a run whose output did not parse keeps its trace up to the failing call
        (`ProgramCall.unparsed_output`). Returns one `ProgramCall` per example, in order, on every rank."""
        lms = [lm] * len(examples) if isinstance(lm, dspy.LM) else list(lm)
        if len(lms) != len(examples):
            raise ValueError(f"one LM per example is needed: {len(lms)} LMs for {len(examples)} examples")
        items = list(zip(examples, lms))
        if self.ranks is None or self.ranks.world_size == 1:
            return self._run_here(program, items, with_trace)
        shared = self.ranks.map_split(
            lambda share: [c.portable(program) for c in self._run_here(program, share, with_trace)], items
        )
        return [call.restored(program) for call in shared]

    def _run_here(self, program: dspy.Module, items: list[tuple[dspy.Example, dspy.LM]],
                  with_trace: bool) -> list[ProgramCall]:
        self.local_calls += len(items)
        if not items:
            return []

        adapter = program_adapter()  # read here: DSPy settings are per thread
        callbacks = dspy.settings.callbacks  # (the console's call counter among them: bt_trl/console.py)

        def call(item: tuple[dspy.Example, dspy.LM]) -> ProgramCall:
            example, lm = item
            result = ProgramCall(example)
            trace: list = []
            failed = _FailedPredictorCall()
            with dspy.context(lm=lm, trace=trace, adapter=adapter,
                              callbacks=[*callbacks, failed] if with_trace else callbacks):
                try:
                    result.prediction = program(**example.inputs())
                except AdapterParseError as error:
                    result.error = "parse"
                    if with_trace and failed.call is not None:
                        predictor, inputs = failed.call
                        result.trace = [*trace, (predictor, inputs, dspy.Prediction())]
                        result.unparsed_output = error.lm_response
                    return result
                except Exception as exc:  # the user's program may raise anything; one bad call must not end the run
                    raise_if_interrupted(exc)
                    logger.warning("Program call failed on %s: %r", example, exc)
                    result.error = "program"
                    return result
            result.trace = trace if with_trace else []
            try:
                value = self.metric(example, result.prediction, trace if with_trace else None)
                result.metric_value = metric_number(value)
                result.score = metric_score(result.metric_value, self.metric_threshold)
            except MetricValueError:
                raise
            except Exception as exc:
                raise_if_interrupted(exc)
                logger.warning("Metric failed on %s: %r", example, exc)
                result.error = "metric"
            return result

        return map_in_threads(call, items, self.num_threads)

    def evaluate(self, program: dspy.Module, examples: list[dspy.Example], lm: dspy.LM) -> RunSummary:
        calls = self.run(program, examples, lm)
        values = [call.metric_value for call in calls if call.metric_value is not None]
        # A threshold above every value the metric gave scores everything 0, which would read as a program failing.
        if self.metric_threshold is not None and values and 0 < max(values) < self.metric_threshold:
            logger.warning("no program call reached metric_threshold=%s (the metric's highest value was %s), so "
                           "every call scored 0: lower metric_threshold to a value the metric returns",
                           self.metric_threshold, max(values))
        return RunSummary.of(calls)
