"""What a run shows: one progress display per step, each step's results row when it ends, the table and the best step
at the end, on the main process's standard output (`sys.stdout` when it is written to, unless `RunConsole.stdout` is
set). bt_trl logs on its own loggers (`bt_trl.*`); during a run their records also go to `output_dir/run.log`. The
output of other libraries, `sys.stdout`/`sys.stderr` and the warnings machinery are left as they are: the `bt-trl`
command, an application, routes them to run.log itself (`bt_trl/cli/output.py`).

The display counts program calls (top-level module calls, whoever makes them: the prompt optimizer, trace collection,
valset scoring; see `ProgramCallCounter`, a DSPy callback), the ones whose output passed the metric and the unparseable
ones; during a w step's fine-tuning, its training steps (`_TrainingProgress`, a `TrainerCallback`). In a notebook it is
a `tqdm.auto` bar; on a terminal one line redrawn in place; when the output is neither (CI logs, a pipe) or with
`disable_tqdm`, a step prints one line when it starts, a status line every `NONINTERACTIVE_INTERVAL` seconds and its
row when it ends.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import dspy
from dspy.utils.callback import BaseCallback
from dspy.utils.callback_context import ACTIVE_CALL_ID
from dspy.utils.exceptions import AdapterParseError
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from bt_trl.core.results import RunState, StepResult, results_header, results_row
from bt_trl.core.runner import passes

logger = logging.getLogger(__name__)

RUN_LOG_FILE = "run.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NONINTERACTIVE_INTERVAL = 300.0  # seconds between status lines when the output is not a terminal
REDRAW_INTERVAL = 0.1  # seconds between redraws of the live line or bar


def run_log_path(args) -> Path:
    """Where a run with `args` (a `TrainingArguments`) logs: `output_dir/run.log`, `run.rank<i>.log` on the other
    processes."""
    index = args.process_index
    return Path(args.output_dir) / (RUN_LOG_FILE if index == 0 else f"run.rank{index}.log")


def in_notebook() -> bool:
    """Running in a Jupyter kernel (the test `tqdm.auto` makes)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in shell.config


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class _StepProgress:
    """The counts behind one progress display."""

    def __init__(self, label: str, expected_calls: int | None):
        self.label = label
        self.expected_calls = expected_calls  # an upper bound for steps whose optimizer may stop early
        self.started = time.perf_counter()
        self.calls = self.passing = self.unparseable = self.errors = 0
        self.training_steps: int | None = None  # set while a w step fine-tunes
        self.training_done = 0
        self.training_started: float | None = None
        self.training_seconds = 0.0

    def status(self, in_bar: bool = False) -> str:
        """The display's line; `in_bar`: what a tqdm bar shows after its label and call count."""
        elapsed = time.perf_counter() - self.started
        expected = f"/{self.expected_calls}" if self.expected_calls is not None else ""
        parts = [] if in_bar else [self.label, f"calls {self.calls}{expected}"]
        parts.append(f"passing {self.passing}")
        if self.unparseable:
            parts.append(f"unparseable {self.unparseable}")
        if self.errors:
            parts.append(f"errors {self.errors}")
        if self.training_steps is not None:
            parts.append(f"training {self.training_done}/{self.training_steps}")
        eta = self._eta(elapsed)
        parts.append(f"{_duration(elapsed)} elapsed" + (f", ETA {eta}" if eta else ""))
        return " | ".join(parts)

    def _eta(self, elapsed: float) -> str | None:
        """Remaining calls at the rate calls have run so far, plus the remaining fine-tuning steps at theirs."""
        training_seconds = self.training_seconds + (
            time.perf_counter() - self.training_started if self.training_started is not None else 0.0)
        remaining = 0.0
        if self.expected_calls is not None:
            if self.calls == 0:
                return None
            remaining += max(self.expected_calls - self.calls, 0) * (elapsed - training_seconds) / self.calls
        if self.training_steps is not None and self.training_done:
            remaining += (self.training_steps - self.training_done) * training_seconds / self.training_done
        return _duration(remaining)


class ProgramCallCounter(BaseCallback):
    """A DSPy callback (in DSPy's settings during a session) that sees every program call end, whichever thread or
    optimizer made it. A program call is a module call made outside any other module call; the modules it calls in
    turn are not counted. (A metric that calls a DSPy module, an LM judge, has its calls counted as well.)"""

    def __init__(self, console: RunConsole):
        self.console = console
        self._module_calls: dict[str, bool] = {}  # module calls under way: call id -> is a program call
        self._lock = threading.Lock()

    def on_module_start(self, call_id, instance, inputs):
        parent = ACTIVE_CALL_ID.get()  # the DSPy call (a module's, or e.g. `Evaluate`'s) this one is made in
        with self._lock:
            self._module_calls[call_id] = parent not in self._module_calls

    def on_module_end(self, call_id, outputs, exception):
        with self._lock:
            is_program_call = self._module_calls.pop(call_id, False)
        if is_program_call:
            self.console._program_call_ended(exception)


class _TrainingProgress(TrainerCallback):
    """Replaces transformers' progress bar and log printer during the w steps' fine-tuning: the training steps show
    in the step's display, the logged values go to bt_trl's log (and `trainer.state.log_history`)."""

    def __init__(self, console: RunConsole):
        self.console = console

    def on_train_begin(self, args, state, control, **kwargs):
        self.console._training_began(state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self.console._training_stepped(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logger.info("logged at training step %d: %s", state.global_step, logs)

    def on_train_end(self, args, state, control, **kwargs):
        self.console._training_ended()


class RunConsole:
    """The display of one trainer (see the module docstring).

    Args:
        output_dir: where `run.log` is written.
        interactive: a bar in a notebook, a redrawn line on a terminal (`disable_tqdm` turns both off); else, and when
            the output is not a terminal, plain lines.
        is_main: only the main process displays anything; every process logs (`run.log`, `run.rank<i>.log`).
        log_name: the log file's name.
        stdout: where the display goes; by default the process's `sys.stdout` at the time of writing.
    """

    def __init__(self, output_dir: str | Path, *, interactive: bool = True, is_main: bool = True,
                 log_name: str = RUN_LOG_FILE, stdout: TextIO | None = None):
        self.log_path = Path(output_dir) / log_name
        self.interactive = interactive
        self.is_main = is_main
        self.stdout = stdout
        self.program_calls = ProgramCallCounter(self)
        self.training_callback = _TrainingProgress(self)
        self._lock = threading.RLock()
        self._depth = 0
        self._progress: _StepProgress | None = None
        self._bar: tqdm | None = None  # the step's bar, in a notebook
        self._last_draw = 0.0
        self.unparseable = 0  # in the current session
        self._live = False  # redrawing a live line (interactive, on a terminal)
        self._notebook = False  # drawing a tqdm.auto bar (interactive, in a notebook)

    @classmethod
    def for_trainer(cls, args) -> RunConsole:
        """The console a trainer with `args` (a `TrainingArguments`) uses: `disable_tqdm` honoured, each process
        logging to its own file."""
        log_path = run_log_path(args)
        return cls(log_path.parent, interactive=not args.disable_tqdm, is_main=args.process_index == 0,
                   log_name=log_path.name)

    def replace_progress_callbacks(self, callback_handler) -> None:
        """Swaps transformers' progress bar and log printer for this console's training progress."""
        callback_handler.remove_callback(ProgressCallback)
        callback_handler.remove_callback(PrinterCallback)
        callback_handler.add_callback(self.training_callback)

    def counting_passes(self, metric, metric_threshold: float | None):
        """`metric` reporting each verdict to the display's `passing` count (the DSPy optimizers, trace collection and
        valset scoring all call the metric once per program call)."""

        @functools.wraps(metric)
        def counted(example, prediction, trace=None):
            value = metric(example, prediction, trace)
            if passes(value, metric_threshold):
                with self._lock:
                    if self._progress is not None:
                        self._progress.passing += 1
                self._draw()
            return value

        return counted

    # ------------------------------------------------------------------------------------------------------------
    # The session: the duration of a run
    # ------------------------------------------------------------------------------------------------------------

    @contextmanager
    def session(self):
        """For the block: bt_trl's log records also go to `run.log` and the program calls are counted (nested
        sessions share the outer one). Nothing else of the process changes."""
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        bt_logger = logging.getLogger("bt_trl")
        file_handler = None
        if not any(isinstance(h, logging.FileHandler) and h.baseFilename == os.path.abspath(self.log_path)
                   for h in bt_logger.handlers):  # (the bt-trl command may log there already)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(self.log_path, encoding="utf-8")
            file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
            bt_logger.addHandler(file_handler)
        self._notebook = self.interactive and self.is_main and in_notebook()
        self._live = self.interactive and self.is_main and not self._notebook and self._stream().isatty()
        self._depth, self.unparseable = 1, 0
        try:
            # DSPy passes its settings on to the threads of its optimizers and Evaluate; bt_trl's ProgramRunner too.
            with dspy.context(callbacks=[*dspy.settings.callbacks, self.program_calls]):
                yield self
        finally:
            self._depth = 0
            self.end()
            if file_handler is not None:
                bt_logger.removeHandler(file_handler)
                file_handler.close()

    # ------------------------------------------------------------------------------------------------------------
    # The display
    # ------------------------------------------------------------------------------------------------------------

    def _stream(self) -> TextIO:
        return self.stdout or sys.stdout

    def print(self, text: str) -> None:
        """A line (or lines) on the console, below nothing: the live line is redrawn after it."""
        if not self.is_main:
            return
        with self._lock:
            self._clear()
            stream = self._stream()
            stream.write(text.rstrip("\n") + "\n")
            stream.flush()
            self._draw(force=True)

    def start_run(self, strategy: str, train_size: int, val_size: int, resumed_after: int | None) -> None:
        resumed = f"; resuming after step {resumed_after}" if resumed_after is not None else ""
        self.print(f"BetterTogether {strategy}: {train_size} train / {val_size} val examples{resumed}; "
                   f"logs in {self.log_path}\n{results_header()}")

    def begin(self, label: str, expected_calls: int | None) -> None:
        """Starts the progress display of a step (or of any run of the program, e.g. a test set's scoring)."""
        with self._lock:
            self._progress = _StepProgress(label, expected_calls)
            if self._notebook:
                self._bar = tqdm(total=expected_calls, desc=label, unit="call", leave=False,
                                 bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} calls{postfix}")
        if not (self._live or self._notebook):
            total = f"{'up to ' if expected_calls is not None else ''}{expected_calls or 'unknown'}"
            self.print(f"{label}: started ({total} program calls)")
        self._draw(force=True)

    def end(self, text: str | None = None) -> None:
        """Ends the progress display, printing `text` in its place."""
        with self._lock:
            self._clear()
            self._progress = None
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        if text:
            self.print(text)

    def end_step(self, step: StepResult) -> None:
        """Ends the step's display, printing its results row (its unparseable answers noted)."""
        unparseable = self._progress.unparseable if self._progress is not None else 0
        self.end(results_row(step, best_index=None, note=f"{unparseable} unparseable" if unparseable else ""))

    def finish(self, state: RunState, output_dir: str | Path) -> None:
        """The results table, the best step, and where the rest is."""
        best = state.best()
        in_full = " in full" if logger.isEnabledFor(logging.INFO) else ""  # (logged at INFO: `_program_call_ended`)
        note = f" ({self.unparseable} unparseable answers{in_full})" if self.unparseable else ""
        self.print(
            f"\n{results_header()}\n" + "".join(results_row(s, best.index) + "\n" for s in state.steps)
            + f"best step: {best.index} ({best.kind}), val score {best.val_score:.1f}; "
            f"results, results.png, program.json and weights in {output_dir}; log: {self.log_path}{note}"
        )

    def _program_call_ended(self, exception: BaseException | None) -> None:
        with self._lock:
            if self._depth == 0:
                return  # a call outside a run (e.g. of the trained program): nothing to show
            progress = self._progress
            if progress is not None:
                progress.calls += 1
            if isinstance(exception, AdapterParseError):
                self.unparseable += 1
                if progress is not None:
                    progress.unparseable += 1
            elif exception is not None and progress is not None:
                progress.errors += 1
        if isinstance(exception, AdapterParseError):
            logger.info("unparseable answer (%s):\n%s", progress.label if progress else "", exception)
        self._draw()

    def _training_began(self, max_steps: int) -> None:
        with self._lock:
            if self._progress is not None:
                self._progress.training_steps, self._progress.training_done = max_steps, 0
                self._progress.training_started = time.perf_counter()
        self._draw(force=True)

    def _training_stepped(self, global_step: int) -> None:
        with self._lock:
            if self._progress is not None:
                self._progress.training_done = global_step
        self._draw()

    def _training_ended(self) -> None:
        with self._lock:
            progress = self._progress
            if progress is not None and progress.training_started is not None:
                progress.training_seconds += time.perf_counter() - progress.training_started
                progress.training_started = None

    def _draw(self, force: bool = False) -> None:
        """Redraws the bar (a notebook) or the live line (a terminal), or prints a status line when one is due
        (neither)."""
        if not self.is_main:
            return
        with self._lock:
            progress, now = self._progress, time.perf_counter()
            if progress is None or (not force and now - self._last_draw < REDRAW_INTERVAL):
                return
            if self._bar is not None:
                self._bar.n = progress.calls
                self._bar.set_postfix_str(progress.status(in_bar=True), refresh=False)
                self._bar.refresh()
                self._last_draw = now
            elif self._live:
                stream = self._stream()
                stream.write("\r" + progress.status()[:shutil.get_terminal_size().columns - 1] + "\x1b[K")
                stream.flush()
                self._last_draw = now
            elif now - max(self._last_draw, progress.started) >= NONINTERACTIVE_INTERVAL:
                stream = self._stream()
                stream.write(progress.status() + "\n")
                stream.flush()
                self._last_draw = now

    def _clear(self) -> None:
        if self._live and self._progress is not None:
            stream = self._stream()
            stream.write("\r\x1b[K")
            stream.flush()
