"""The prompt optimizers a strategy names: the built-in `p`, `gepa`, `mipro`, `simba`, and the user's own.

A name maps to a DSPy `Teleprompter`, or to a factory `factory(lm) -> Teleprompter` called at each of its steps with
the `dspy.LM` that serves the step (the current weights): that LM is what GEPA reflects with and what MIPROv2 and
SIMBA propose with, unless the user gives another. A `TeleprompterSpec` is such a factory written as data (a
`dspy.teleprompt` class and its arguments), as recipes give them (`BetterTogetherConfig.prompt_optimizers`).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import dspy
from dspy import teleprompt
from dspy.teleprompt import GEPA, SIMBA, BetterTogether, BootstrapFinetune, MIPROv2, Teleprompter

from bt_trl.steps.strategy import PROMPT_STEP, check_step_name

# A prompt step's optimizer: a teleprompter, or a factory building one around the `dspy.LM` serving the step.
PromptOptimizer = Teleprompter | Callable[[dspy.LM], Teleprompter]
# DSPy's Evaluate cancels a whole evaluation after `max_errors` failed calls (10 by default). A small model's
# unparseable answers are ordinary failures here: they score 0 and the search goes on.
NO_ERROR_LIMIT = sys.maxsize

# Constructor arguments that take an LM: the served one unless given (a string is a model name for `dspy.LM`).
LM_ARGUMENTS = ("reflection_lm", "prompt_model", "task_model")
GEPA_BUDGETS = ("auto", "max_metric_calls", "max_full_evals")  # GEPA takes exactly one
# Teleprompters that are not prompt optimizers: the weight step is bt_trl's own (`w`/`sft`).
NOT_PROMPT_OPTIMIZERS = (BootstrapFinetune, BetterTogether)
CLASS_KEY = "class"
COMPILE_INPUTS = ("self", "student", "trainset", "valset", "teacher")  # what the prompt step passes `compile` itself


def teleprompter_classes() -> dict[str, type[Teleprompter]]:
    """The classes a spec may name: DSPy's prompt optimizers (`dspy.teleprompt`), by class name."""
    return {name: value for name, value in vars(teleprompt).items()
            if isinstance(value, type) and issubclass(value, Teleprompter) and value is not Teleprompter
            and not issubclass(value, NOT_PROMPT_OPTIMIZERS)}


def feedback_metric(metric: Callable[..., Any]) -> Callable[..., float]:
    """GEPA's five-argument metric `(gold, pred, trace, pred_name, pred_trace)` scoring with the user's
    `metric(example, prediction, trace)`; DSPy's GEPA adds the feedback "This trajectory got a score of ..."."""

    def score(gold, pred, trace=None, pred_name=None, pred_trace=None) -> float:
        return float(metric(gold, pred, trace))

    return score


@dataclass(frozen=True)
class TeleprompterSpec:
    """A `dspy.teleprompt` class, its constructor arguments and its `compile` arguments (those only `compile` takes,
    such as MIPROv2's `num_trials`): a factory building it at each step around the served LM. Constructor arguments
    not given are filled where the class takes them: `metric` (GEPA's wrapped by `feedback_metric`), the LM arguments
    (`LM_ARGUMENTS`), `num_threads`, `metric_threshold`, and no error limit (`max_errors`); the metric and the
    settings are bound by `bound`."""

    optimizer_class: type[Teleprompter]
    kwargs: dict[str, Any] = field(default_factory=dict)
    compile_kwargs: dict[str, Any] = field(default_factory=dict)
    metric: Callable[..., Any] | None = None
    num_threads: int | None = None
    metric_threshold: float | None = None

    @classmethod
    def parse(cls, name: str, spec: Mapping[str, Any], default: TeleprompterSpec | None = None) -> TeleprompterSpec:
        """`{"class": "GEPA", "auto": "light"}` (`class` may be written `dspy.GEPA` or `dspy.teleprompt.GEPA`).
        Without a class, the arguments change those of `default` (the built-in step of that name)."""
        owner = f"prompt_optimizers[{name!r}]"
        if not isinstance(spec, Mapping):
            raise ValueError(f"{owner} must be a mapping such as {{class: GEPA, auto: light}}, got {spec!r}")
        kwargs = {k: v for k, v in spec.items() if k != CLASS_KEY}
        if CLASS_KEY in spec:
            classes = teleprompter_classes()
            class_name = str(spec[CLASS_KEY]).removeprefix("dspy.").removeprefix("teleprompt.")
            if class_name not in classes:
                raise ValueError(f"{owner}: class {spec[CLASS_KEY]!r} is not a DSPy prompt optimizer; "
                                 f"choose one of {', '.join(sorted(classes))} (from dspy.teleprompt)")
            optimizer_class = classes[class_name]
        elif default is not None:
            optimizer_class, kwargs = default.optimizer_class, default.with_arguments(kwargs)
        else:
            raise ValueError(f"{owner} names no class; add one, e.g. {{class: GEPA, auto: light}}"
                             + (" (p's default is set by max_bootstrapped_demos, max_labeled_demos, "
                                "num_candidate_programs, max_rounds)" if name == PROMPT_STEP else ""))
        parameters = inspect.signature(optimizer_class.__init__).parameters
        compiling = [p for p in inspect.signature(optimizer_class.compile).parameters if p not in COMPILE_INPUTS]
        takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        unknown = sorted(k for k in kwargs if k == "metric" or not (takes_any or k in parameters or k in compiling))
        if unknown:
            accepted = [p for p in dict.fromkeys([*parameters, *compiling]) if p not in ("self", "metric")]
            raise ValueError(f"{owner}: {optimizer_class.__name__} takes no argument {', '.join(unknown)} here "
                             f"(the metric is the trainer's); it takes {', '.join(accepted)}")
        constructing = {k: v for k, v in kwargs.items() if takes_any or k in parameters}
        return cls(optimizer_class, constructing, {k: v for k, v in kwargs.items() if k not in constructing})

    def with_arguments(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """These arguments changed by `kwargs`; a GEPA budget given replaces the default one."""
        base = self.kwargs | self.compile_kwargs
        if issubclass(self.optimizer_class, GEPA) and any(k in kwargs for k in GEPA_BUDGETS):
            base = {k: v for k, v in base.items() if k not in GEPA_BUDGETS}
        return base | dict(kwargs)

    def bound(self, metric: Callable[..., Any], num_threads: int, metric_threshold: float | None) -> TeleprompterSpec:
        return replace(self, metric=metric, num_threads=num_threads, metric_threshold=metric_threshold)

    def __call__(self, lm: dspy.LM) -> Teleprompter:
        parameters = inspect.signature(self.optimizer_class.__init__).parameters
        kwargs = dict(self.kwargs)
        if "metric" in parameters:
            kwargs["metric"] = feedback_metric(self.metric) if issubclass(self.optimizer_class, GEPA) else self.metric
        for name in LM_ARGUMENTS:
            if name in parameters:
                given = kwargs.get(name)
                kwargs[name] = lm if given is None else dspy.LM(given) if isinstance(given, str) else given
        for name, value in (("num_threads", self.num_threads), ("metric_threshold", self.metric_threshold),
                            ("max_errors", NO_ERROR_LIMIT)):
            if name in parameters:
                kwargs.setdefault(name, value)
        return self.optimizer_class(**kwargs)


def built_in_specs(train_size: int) -> dict[str, TeleprompterSpec]:
    """`gepa`, `mipro` and `simba` as bt_trl runs them unless told otherwise: DSPy's defaults with its smallest
    automatic budgets, and SIMBA's mini-batches no larger than the trainset (it refuses larger ones)."""
    return {
        "gepa": TeleprompterSpec(GEPA, {"auto": "light"}),
        "mipro": TeleprompterSpec(MIPROv2, {"auto": "light"}),
        "simba": TeleprompterSpec(SIMBA, {"bsize": min(32, train_size)}),
    }


def named_prompt_optimizers(configured: Mapping[str, Mapping] | None, given: Mapping[str, Any] | None,
                            defaults: dict[str, TeleprompterSpec],
                            prompt_optimizer: PromptOptimizer | None = None) -> dict[str, PromptOptimizer]:
    """Every prompt step name → its teleprompter or factory: the built-in `defaults`, then the specs of
    `configured` (`BetterTogetherConfig.prompt_optimizers`), then `given` (the trainer's or callback's
    `prompt_optimizers=`). Checked before any model work, each problem a ValueError naming it: a name not well formed
    or naming a weight step, a name given in both, `p` given besides `prompt_optimizer=`, a weight optimizer, a value
    that is not a teleprompter, a factory or a spec, a spec's class or arguments. `p`, when given (as
    `prompt_optimizer` or by name), is among them."""
    configured, given = dict(configured or {}), dict(given or {})
    for owner, optimizers in (("BetterTogetherConfig.prompt_optimizers", configured), ("prompt_optimizers", given)):
        for name, optimizer in optimizers.items():
            check_step_name(name, owner)
            if isinstance(optimizer, NOT_PROMPT_OPTIMIZERS):
                raise ValueError(f"{owner}[{name!r}]: {type(optimizer).__name__} is not a prompt optimizer; the "
                                 "weight step is 'w' (or 'sft') in the strategy")
            if not isinstance(optimizer, Teleprompter | Mapping) and not callable(optimizer):
                raise ValueError(f"{owner}[{name!r}] must be a DSPy Teleprompter, a factory lm -> Teleprompter, or "
                                 f"a mapping {{class: ..., <argument>: ...}}; got {type(optimizer).__name__}")
        if prompt_optimizer is not None and PROMPT_STEP in optimizers:
            raise ValueError(f"'p' is given twice: as prompt_optimizer= and in {owner}; keep one")
    if configured.keys() & given.keys():
        raise ValueError(f"prompt optimizers {sorted(configured.keys() & given.keys())} are given both in "
                         "BetterTogetherConfig.prompt_optimizers and in prompt_optimizers=; keep one of each")
    optimizers: dict[str, PromptOptimizer] = dict(defaults)
    if prompt_optimizer is not None:
        optimizers[PROMPT_STEP] = prompt_optimizer
    for name, optimizer in (configured | given).items():
        optimizers[name] = (TeleprompterSpec.parse(name, optimizer, defaults.get(name))
                            if isinstance(optimizer, Mapping) else optimizer)
    return optimizers


def bound(optimizers: Mapping[str, PromptOptimizer], metric: Callable[..., Any], num_threads: int,
          metric_threshold: float | None) -> dict[str, PromptOptimizer]:
    """`optimizers` with the specs' metric and settings bound (`TeleprompterSpec.bound`)."""
    return {name: optimizer.bound(metric, num_threads, metric_threshold) if isinstance(optimizer, TeleprompterSpec)
            else optimizer for name, optimizer in optimizers.items()}


def describe(optimizer: PromptOptimizer) -> str:
    """For the model card: the teleprompter's class (a factory's: "built per step")."""
    if isinstance(optimizer, TeleprompterSpec):
        return optimizer.optimizer_class.__name__
    return type(optimizer).__name__ if isinstance(optimizer, Teleprompter) else "built per step"
