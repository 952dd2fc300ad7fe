"""What a run prints: one progress display per step, each step's results row when it ends, the table and the best step
at the end. Everything else — DSPy's and transformers' logs, prints and progress bars, every unparseable answer in
full — goes to `output_dir/run.log`; a warning reaches the console once.

`RunConsole.session()` routes the output for the duration of a run: the loggers of the libraries a run uses write to
`run.log` instead of the terminal, `sys.stdout`/`sys.stderr` are logged there line by line (DSPy prints its optimizer's
progress and draws tqdm bars), and Python warnings are logged there and shown on the console the first time only (not
at all when raised inside those libraries: deprecations between them, mostly).
Everything is restored when the session ends.

The display counts program calls (top-level module calls, whoever makes them: the prompt optimizer, trace collection,
valset scoring; see `ProgramCallCounter`), the ones whose output passed the metric and the unparseable ones. On a
terminal it is one line redrawn in place; when the output is not a terminal (CI logs, a pipe) or with `disable_tqdm`, a
step prints one line when it starts, a status line every `NONINTERACTIVE_INTERVAL` seconds and its row when it ends.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import dspy
from dspy.utils.callback import BaseCallback
from dspy.utils.callback_context import ACTIVE_CALL_ID
from dspy.utils.exceptions import AdapterParseError
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from bt_trl.core.results import RunState, StepResult, results_header, results_row
from bt_trl.core.runner import passes

logger = logging.getLogger(__name__)

RUN_LOG_FILE = "run.log"
# Loggers whose records go to run.log only during a session (their levels are left as they are).
LIBRARY_LOGGERS = ("dspy", "transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub", "torch",
                   "LiteLLM", "httpx", "urllib3", "filelock", "stdout", "stderr", "py.warnings")
# Python warnings raised inside these packages (deprecations between them, mostly) go to run.log only.
LIBRARY_PACKAGES = frozenset({"dspy", "transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub",
                              "torch", "litellm", "tokenizers", "safetensors"})
NONINTERACTIVE_INTERVAL = 300.0  # seconds between status lines when the output is not a terminal
REDRAW_INTERVAL = 0.1  # seconds between redraws of the live line
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _from_library(filename: str) -> bool:
    parts = Path(filename).parts
    return any(part in ("site-packages", "dist-packages") and parts[i + 1] in LIBRARY_PACKAGES
               for i, part in enumerate(parts[:-1]))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class _LoggedStream:
    """A text stream that logs each complete line it is given. A carriage return starts the line over (tqdm redraws
    its bar that way), so a progress bar is logged once, in its last state; terminal escape codes are dropped."""

    def __init__(self, target: logging.Logger):
        self._logger = target
        self._line = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._line = (self._line + text).split("\n")
            self._line = self._line.rsplit("\r", 1)[-1]
        for line in lines:
            line = _ANSI_ESCAPE.sub("", line.rsplit("\r", 1)[-1]).rstrip()
            if line.strip():
                self._logger.info(line)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            line, self._line = _ANSI_ESCAPE.sub("", self._line).rstrip(), ""
        if line.strip():
            self._logger.info(line)

    def isatty(self) -> bool:
        return False


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

    def status(self) -> str:
        elapsed = time.perf_counter() - self.started
        expected = f"/{self.expected_calls}" if self.expected_calls is not None else ""
        parts = [self.label, f"calls {self.calls}{expected}", f"passing {self.passing}"]
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
    in the step's display, the logged values go to run.log."""

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


class _ConsoleOnce(logging.Handler):
    """Shows a log record on the console the first time its message template is seen."""

    def __init__(self, console: RunConsole, level: int):
        super().__init__(level)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        if self.console._first_time(("log", record.name, str(record.msg))):
            self.console.print(f"{record.levelname.lower()}: {record.getMessage()}", stream=self.console._stderr)


class RunConsole:
    """The console of one trainer (see the module docstring).

    Args:
        output_dir: where `run.log` is written.
        interactive: redraw a live line when the output is a terminal (`disable_tqdm` turns it off); else, and when
            the output is not a terminal, print plain lines.
        log_level: bt_trl's own messages at this level and above are shown on the console (each once).
        is_main: only the main process displays anything; every process logs (`run.log`, `run.rank<i>.log`).
        log_name: the log file's name.
    """

    def __init__(self, output_dir: str | Path, *, interactive: bool = True, log_level: int = logging.WARNING,
                 is_main: bool = True, log_name: str = RUN_LOG_FILE):
        self.log_path = Path(output_dir) / log_name
        self.interactive = interactive
        self.log_level = log_level
        self.is_main = is_main
        self.program_calls = ProgramCallCounter(self)
        self.training_callback = _TrainingProgress(self)
        self._lock = threading.RLock()
        self._depth = 0
        self._progress: _StepProgress | None = None
        self._last_draw = 0.0
        self._seen: set = set()
        self._hidden = 0  # warnings in run.log only: repeats, and those of the libraries
        self.unparseable = 0  # in the current session
        self._stdout = self._stderr = None  # the real streams, during a session
        self._live = False  # redrawing a live line (interactive, on a terminal)

    @classmethod
    def for_trainer(cls, args) -> RunConsole:
        """The console a trainer with `args` (a `TrainingArguments`) uses: `disable_tqdm` and `log_level` (per process,
        as transformers reads it) honoured."""
        is_main = args.process_index == 0
        return cls(args.output_dir, interactive=not args.disable_tqdm, log_level=args.get_process_log_level(),
                   is_main=is_main, log_name=RUN_LOG_FILE if is_main else f"run.rank{args.process_index}.log")

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
    # The session: where output goes while a run is on
    # ------------------------------------------------------------------------------------------------------------

    @contextmanager
    def session(self):
        """Routes library logs, prints and warnings to `run.log` for the block (nested sessions share the outer one)."""
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(self.log_path, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        routed = {name: logging.getLogger(name) for name in (*LIBRARY_LOGGERS, "bt_trl")}
        saved = {name: (list(lg.handlers), lg.propagate, lg.level) for name, lg in routed.items()}
        for lg in routed.values():
            lg.handlers = [file_handler]
            lg.propagate = False
        bt_logger = routed["bt_trl"]
        bt_logger.setLevel(min(logging.INFO, self.log_level))  # run.log gets bt_trl's info messages
        if self.is_main:
            bt_logger.addHandler(_ConsoleOnce(self, self.log_level))
        for name in ("stdout", "stderr", "py.warnings"):
            routed[name].setLevel(logging.INFO)
        self._stdout, self._stderr = sys.stdout, sys.stderr
        self._live = self.interactive and self.is_main and self._stdout.isatty()
        sys.stdout, sys.stderr = _LoggedStream(routed["stdout"]), _LoggedStream(routed["stderr"])
        previous_showwarning = warnings.showwarning
        warnings.showwarning = functools.partial(self._show_warning, previous_showwarning)
        self._depth, self.unparseable = 1, 0
        logger.info("session started")
        try:
            # DSPy passes its settings on to the threads of its optimizers and Evaluate; bt_trl's ProgramRunner too.
            with dspy.context(callbacks=[*dspy.settings.callbacks, self.program_calls]):
                yield self
        finally:
            self._depth = 0
            self._clear()
            warnings.showwarning = previous_showwarning
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            sys.stdout, sys.stderr = self._stdout, self._stderr
            self._stdout = self._stderr = None
            for name, lg in routed.items():
                lg.handlers, lg.propagate, lg.level = saved[name]
            file_handler.close()

    def _show_warning(self, previous, message, category, filename, lineno, file=None, line=None):
        logging.getLogger("py.warnings").warning(
            "%s", warnings.formatwarning(message, category, filename, lineno, line).rstrip())
        if _from_library(filename):
            with self._lock:
                self._hidden += 1
        elif self.is_main and self._first_time(("warning", category, str(message))):
            with self._lock:
                self._clear()
                previous(message, category, filename, lineno, self._stderr, line)  # (pytest's recorder, if any)
                self._draw(force=True)

    def _first_time(self, key) -> bool:
        with self._lock:
            if key in self._seen:
                self._hidden += 1
                return False
            self._seen.add(key)
            return True

    # ------------------------------------------------------------------------------------------------------------
    # The display
    # ------------------------------------------------------------------------------------------------------------

    def print(self, text: str, stream=None) -> None:
        """A line (or lines) on the console, below nothing: the live line is redrawn after it."""
        if not self.is_main:
            return
        with self._lock:
            self._clear()
            stream = stream or self._stdout or sys.stdout
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
        if not self._live:
            total = f"{'up to ' if expected_calls is not None else ''}{expected_calls or 'unknown'}"
            self.print(f"{label}: started ({total} program calls)")
        self._draw(force=True)

    def end(self, text: str | None = None) -> None:
        """Ends the progress display, printing `text` in its place."""
        with self._lock:
            self._clear()
            self._progress = None
        if text:
            self.print(text)

    def end_step(self, step: StepResult) -> None:
        """Ends the step's display, printing its results row (its unparseable answers noted: they are in run.log)."""
        unparseable = self._progress.unparseable if self._progress is not None else 0
        self.end(results_row(step, best_index=None, note=f"{unparseable} unparseable" if unparseable else ""))

    def finish(self, state: RunState, output_dir: str | Path) -> None:
        """The results table, the best step, and where the rest is."""
        best = state.best()
        notes = [f"{self.unparseable} unparseable answers in full" if self.unparseable else "",
                 f"{self._hidden} warnings not shown here" if self._hidden else ""]
        notes = ", ".join(n for n in notes if n)
        self.print(
            f"\n{results_header()}\n" + "".join(results_row(s, best.index) + "\n" for s in state.steps)
            + f"best step: {best.index} ({best.kind}), val score {best.val_score:.1f}; "
            f"results, results.png, program.json and weights in {output_dir}; "
            f"log: {self.log_path}{' (' + notes + ')' if notes else ''}"
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
        """Redraws the live line (a terminal), or prints a status line when one is due (not a terminal)."""
        if not self.is_main:
            return
        with self._lock:
            progress, now = self._progress, time.perf_counter()
            if progress is None or self._stdout is None:
                return
            if self._live:
                if force or now - self._last_draw >= REDRAW_INTERVAL:
                    width = shutil.get_terminal_size().columns - 1
                    self._stdout.write("\r" + progress.status()[:width] + "\x1b[K")
                    self._stdout.flush()
                    self._last_draw = now
            elif now - max(self._last_draw, progress.started) >= NONINTERACTIVE_INTERVAL:
                self._stdout.write(progress.status() + "\n")
                self._stdout.flush()
                self._last_draw = now

    def _clear(self) -> None:
        if self._live and self._progress is not None:
            self._stdout.write("\r\x1b[K")
            self._stdout.flush()
