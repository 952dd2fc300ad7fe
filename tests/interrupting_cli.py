"""`bt-trl` in a process of its own, interrupted by Ctrl-C (SIGINT to this process) at a moment the test chooses:
the task's metric sends it on its Nth call, so the interruption lands in the same place on every run, loaded machine
or not.

    python tests/interrupting_cli.py N reproduce --task iris ...
"""

import os
import signal
import sys
import threading

from bt_trl.cli import main
from bt_trl.tasks import iris

interrupt_at_call = int(sys.argv[1])
calls = 0
calls_lock = threading.Lock()
iris_metric = iris.metric


def interrupting_metric(example, prediction, trace=None):
    global calls
    with calls_lock:
        calls += 1
        now = calls == interrupt_at_call
    if now:
        os.kill(os.getpid(), signal.SIGINT)
    return iris_metric(example, prediction, trace)


iris.metric = interrupting_metric
sys.exit(main(sys.argv[2:]))
