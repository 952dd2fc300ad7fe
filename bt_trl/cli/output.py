"""The quiet console of the `bt-trl` command: a screenful per run, everything else in `run.log`.

The command is an application, so it decides where the process's output goes (the library leaves it alone:
`bt_trl/console.py`). While `QuietConsole.routing()` is on, the loggers of the libraries a run uses write to `run.log`
instead of the terminal, `sys.stdout`/`sys.stderr` are logged there line by line (DSPy prints its optimizer's progress
and draws tqdm bars), and Python warnings are logged there and shown on the terminal the first time only (not at all
when raised inside those libraries: deprecations between them, mostly). bt_trl's own records go to `run.log` from INFO
on (every unparseable answer in full) and reach the terminal once each from `log_level` on. The run's display writes
to the terminal (`QuietConsole.stdout`). Everything is restored when the routing ends.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from bt_trl.console import LOG_FORMAT, run_log_path

# Loggers whose records go to run.log only (their levels are left as they are).
LIBRARY_LOGGERS = ("dspy", "transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub", "torch",
                   "LiteLLM", "httpx", "urllib3", "filelock", "stdout", "stderr", "py.warnings")
# Python warnings raised inside these packages (deprecations between them, mostly) go to run.log only.
LIBRARY_PACKAGES = frozenset({"dspy", "transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub",
                              "torch", "litellm", "tokenizers", "safetensors"})
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _from_library(filename: str) -> bool:
    parts = Path(filename).parts
    return any(part in ("site-packages", "dist-packages") and parts[i + 1] in LIBRARY_PACKAGES
               for i, part in enumerate(parts[:-1]))


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


class _TerminalOnce(logging.Handler):
    """Shows a log record on the terminal the first time its message template is seen."""

    def __init__(self, quiet: QuietConsole, level: int):
        super().__init__(level)
        self.quiet = quiet

    def emit(self, record: logging.LogRecord) -> None:
        if self.quiet._first_time(("log", record.name, str(record.msg))):
            self.quiet.show(f"{record.levelname.lower()}: {record.getMessage()}")


class QuietConsole:
    """Routes the process's output to `log_path` (see the module docstring).

    Args:
        log_path: the run's log file.
        is_main: only the main process shows anything; every process logs.
        log_level: bt_trl's own messages at this level and above are shown on the terminal (each once).
    """

    def __init__(self, log_path: str | Path, *, is_main: bool = True, log_level: int = logging.WARNING):
        self.log_path = Path(log_path)
        self.is_main = is_main
        self.log_level = log_level
        self.stdout: TextIO | None = None  # the terminal's streams, while routing
        self.stderr: TextIO | None = None
        self.hidden = 0  # warnings in run.log only: repeats, and those of the libraries
        self._seen: set = set()
        self._lock = threading.Lock()

    @classmethod
    def for_run(cls, args) -> QuietConsole:
        """For a run with `args` (a `TrainingArguments`): its process's log file and log level, as the trainer's
        display uses them."""
        return cls(run_log_path(args), is_main=args.process_index == 0, log_level=args.get_process_log_level())

    @contextmanager
    def routing(self):
        """The process's output to `log_path` for the block; the terminal's streams in `stdout`/`stderr`."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(self.log_path, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        routed = {name: logging.getLogger(name) for name in (*LIBRARY_LOGGERS, "bt_trl")}
        saved = {name: (list(lg.handlers), lg.propagate, lg.level) for name, lg in routed.items()}
        for lg in routed.values():
            lg.handlers = [file_handler]
            lg.propagate = False
        bt_logger = routed["bt_trl"]
        bt_logger.setLevel(min(logging.INFO, self.log_level))  # run.log gets bt_trl's info messages
        if self.is_main:
            bt_logger.addHandler(_TerminalOnce(self, self.log_level))
        for name in ("stdout", "stderr", "py.warnings"):
            routed[name].setLevel(logging.INFO)
        self.stdout, self.stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _LoggedStream(routed["stdout"]), _LoggedStream(routed["stderr"])
        previous_showwarning = warnings.showwarning
        warnings.showwarning = functools.partial(self._show_warning, previous_showwarning)
        try:
            yield self
        finally:
            warnings.showwarning = previous_showwarning
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            sys.stdout, sys.stderr = self.stdout, self.stderr
            for name, lg in routed.items():
                lg.handlers, lg.propagate, lg.level = saved[name]
            file_handler.close()
            if self.hidden and self.is_main:
                self.show(f"({self.hidden} more warning{'s' if self.hidden > 1 else ''} in {self.log_path})")
            self.stdout = self.stderr = None

    def show(self, text: str) -> None:
        """A line on the terminal's error stream."""
        self._erase_live_line()
        self.stderr.write(text + "\n")
        self.stderr.flush()

    def _erase_live_line(self) -> None:
        """The display's live line, if any, makes way for a message (the display redraws it at its next event)."""
        if self.stdout.isatty():
            self.stdout.write("\r\x1b[K")
            self.stdout.flush()

    def _show_warning(self, previous, message, category, filename, lineno, file=None, line=None):
        logging.getLogger("py.warnings").warning(
            "%s", warnings.formatwarning(message, category, filename, lineno, line).rstrip())
        if _from_library(filename):
            with self._lock:
                self.hidden += 1
        elif self.is_main and self._first_time(("warning", category, str(message))):
            self._erase_live_line()
            previous(message, category, filename, lineno, self.stderr, line)  # (pytest's recorder, if any)

    def _first_time(self, key) -> bool:
        with self._lock:
            if key in self._seen:
                self.hidden += 1
                return False
            self._seen.add(key)
            return True
