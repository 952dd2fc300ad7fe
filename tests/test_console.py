"""What a run prints and writes besides its results: the console of `bt-trl train` (run as a user runs it, in a
subprocess), run.log, the process's output left alone when the trainer is used from Python (in-process and in a
notebook), the trainset/valset overlap warning, TensorBoard's event files, results.png, `bt-trl evaluate`."""

import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import nbformat
import pytest
import tomllib
from conftest import tiny_model
from matplotlib.image import imread
from nbclient import NotebookClient
from peft import LoraConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import TrainerCallback

from bt_trl import BetterTogetherConfig, BetterTogetherTrainer, load_program
from bt_trl.cli import main as bt_trl_main
from bt_trl.cli.output import QuietConsole
from bt_trl.console import RunConsole
from bt_trl.core.runner import ProgramRunner
from bt_trl.tasks import iris

REPO = Path(__file__).resolve().parents[1]


def config(output_dir, **overrides):
    values = dict(
        strategy="w", report_to="none", num_candidate_programs=0, max_bootstrapped_demos=1, max_labeled_demos=1,
        generation_max_tokens=48, num_train_epochs=1, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", activation_checkpointing=False, max_length=1024, seed=0, use_cpu=True,
    )
    values.update(overrides)
    return BetterTogetherConfig(str(output_dir), **values)


def test_the_console_script_is_the_cli():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"bt-trl": "bt_trl.cli:main"}
    assert bt_trl_main(["--help"]) == 0


@pytest.mark.parametrize("log_level", [logging.WARNING, logging.ERROR])
def test_the_cli_routes_library_output_to_run_log_and_shows_warnings_once(tmp_path, capsys, recwarn, log_level):
    library_handlers = list(logging.getLogger("transformers").handlers)
    quiet = QuietConsole(tmp_path / "run.log", log_level=log_level)
    message = "a warning of the caller's"
    with quiet.routing(), RunConsole(tmp_path, stdout=quiet.stdout).session() as console, warnings.catch_warnings():
        warnings.simplefilter("always")  # every occurrence reaches the routing, not only the first of each line
        for _ in range(3):
            logging.getLogger("bt_trl.trainer").warning("w step %d: nothing to train on", 2)
            warnings.warn(message, UserWarning, stacklevel=1)
        logging.getLogger("transformers.trainer").warning("a library's warning")
        print("a library's print")
        console.begin("step 1/1 p", 10)
        console.end("| 1 | p | row |")
    shown = capsys.readouterr()
    log = (tmp_path / "run.log").read_text()

    assert log.count("nothing to train on") == 3 and log.count("a warning of the caller's") == 3
    assert "a library's warning" in log and "a library's print" in log
    assert "a library's" not in shown.out + shown.err
    # bt_trl's own messages at the log level and above, once; a Python warning once (to whoever showed warnings
    # before the routing: here pytest's recorder); no redrawn line off a terminal; the repeats counted at the end.
    assert shown.err.count("nothing to train on") == (1 if log_level <= logging.WARNING else 0)
    assert [str(w.message) for w in recwarn] == [message]
    assert shown.out == "step 1/1 p: started (up to 10 program calls)\n| 1 | p | row |\n"
    repeats = 4 if log_level <= logging.WARNING else 2
    assert shown.err.endswith(f"({repeats} more warnings in {tmp_path / 'run.log'})\n")
    assert logging.getLogger("transformers").handlers == library_handlers  # restored


def test_bt_trl_train_prints_a_screenful_and_logs_the_rest(tokenizer, tmp_path):
    # A tiny random model without structured generation: every answer is unparseable, the worst case for the
    # console (the demo printed each one in full).
    model_dir = tmp_path / "tiny-random"
    tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    output_dir = tmp_path / "run"
    command = [sys.executable, "-m", "bt_trl.cli", "train", "--task", "iris", "--train_size", "4", "--val_size", "4",
               "--test_size", "4", "--strategy", "p -> w", "--model_name_or_path", str(model_dir),
               "--output_dir", str(output_dir), "--structured_generation", "false", "--generation_max_tokens", "16",
               "--num_candidate_programs", "0", "--max_bootstrapped_demos", "1", "--max_labeled_demos", "1",
               "--use_peft", "--lora_r", "8", "--lora_target_modules", "q_proj", "v_proj", "--use_cpu",
               "--activation_checkpointing", "false", "--report_to", "none", "--save_strategy", "no"]
    env = dict(os.environ, DSPY_CACHEDIR=str(tmp_path / "dspy_cache"))
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    lines = console.splitlines()

    assert len(lines) <= 30, console
    assert "\r" not in console  # not a terminal: plain lines, no redrawn progress bar
    # The table at the end, each step's row as it ended, and the best step.
    assert console.count("| step | kind | val score |") == 2
    for row in ("| 0 | vanilla | 0.0 |", "| 1 | p | 0.0 |", "| 2 | w | 0.0 | 0 / 4 |"):
        assert sum(line.startswith(row) for line in lines) == 2, row
    assert "best step: 0 (vanilla)" in console and "test score: 0.0 (0/4 passing)" in console
    # Warnings once each: the w step's "no trace to train on" warning is shown, once.
    warned = [line for line in lines if "Warning" in line or line.startswith("warning")]
    assert len(warned) == len(set(warned))
    assert sum("w step 2: no trace to train on" in line for line in lines) == 1
    # No library output on the console: DSPy's optimizer prints and progress bars are in run.log.
    assert not any("average metric" in line or "Bootstrapped" in line or "it/s]" in line for line in lines)

    log = (output_dir / "run.log").read_text()
    assert "Candidate of seed -3: average metric" in log and "Bootstrapped 0 full traces" in log
    # Every unparseable answer is in run.log in full, and counted on the console (the training's; the test set's
    # scoring follows it).
    logged = log.count("unparseable answer (step ")
    assert logged > 0 and log.count("LM Response:") >= logged + log.count("unparseable answer (evaluation)") > logged
    counted = re.search(r"\((\d+) unparseable answers in full", console)
    assert counted and int(counted.group(1)) == logged
    assert (output_dir / "results.png").read_bytes().startswith(b"\x89PNG")


def test_used_from_python_a_run_leaves_the_process_output_alone(format_model, tokenizer, tmp_path):
    """No logger's handlers, stream or warnings hook changes: a user's own handlers (on a library's logger, DSPy's and
    the root logger) keep receiving records, and prints go where the user sends them, during train() and after. The
    display and the results table go there too."""
    received: list[str] = []

    class Received(logging.Handler):
        def emit(self, record):
            received.append(record.getMessage())

    handler = Received()
    loggers = [logging.getLogger(), logging.getLogger("transformers"), logging.getLogger("dspy")]
    printed = io.StringIO()
    showwarning = warnings.showwarning
    during: list[tuple[str, bool, bool, bool]] = []  # (event, sys.stdout unchanged, handlers there, hook unchanged)

    def look(event: str) -> None:
        during.append((event, sys.stdout is printed, all(handler in lg.handlers for lg in loggers),
                       warnings.showwarning is showwarning))

    def metric(example, prediction, trace=None):
        look("metric")
        print("printed by the metric")
        logging.getLogger("transformers.user").warning("a library's record during train")
        logging.getLogger("user.app").warning("the user's record during train")
        return True  # every parseable answer passes: the w step trains

    class Looking(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            look("training step")

    train, val, _ = iris.load_splits(0, (4, 2, 0))
    for lg in loggers:
        lg.addHandler(handler)
    try:
        trainer = BetterTogetherTrainer(
            model=format_model, args=config(tmp_path, generation_max_tokens=48), program=iris.program(),
            metric=metric, trainset=train, valset=val, processing_class=tokenizer, callbacks=[Looking()],
        )
        with contextlib.redirect_stdout(printed):  # the user's choice of where prints go
            trainer.train()
            look("after train")
            print("printed after train")
            logging.getLogger("transformers.user").warning("a library's record after train")
    finally:
        for lg in loggers:
            lg.removeHandler(handler)

    events = {event for event, *_ in during}
    assert {"metric", "training step", "after train"} <= events
    assert all(stdout_kept and handlers_kept and hook_kept for _, stdout_kept, handlers_kept, hook_kept in during)
    shown = printed.getvalue()
    assert "printed by the metric" in shown and "printed after train" in shown
    assert "| step | kind | val score |" in shown and "best step:" in shown
    for message in ("a library's record during train", "the user's record during train",
                    "a library's record after train"):
        assert message in received, message


def test_a_notebook_shows_the_progress_and_the_results_table(tokenizer, tmp_path):
    model_dir = tmp_path / "tiny-random"
    tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    code = f"""
import dspy
from bt_trl import BetterTogetherConfig, BetterTogetherTrainer
from bt_trl.tasks import iris

dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
train, val, _ = iris.load_splits(0, (2, 2, 0))
args = BetterTogetherConfig({str(tmp_path / "run")!r}, strategy="p", num_candidate_programs=0,
                            max_bootstrapped_demos=1, max_labeled_demos=1, generation_max_tokens=8, use_cpu=True,
                            report_to="none", save_strategy="no")
trainer = BetterTogetherTrainer(model={str(model_dir)!r}, args=args, program=iris.program(), metric=iris.metric,
                                trainset=train, valset=val)
trainer.train()
"""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = notebook.cells[0].outputs

    assert not [o for o in outputs if o.output_type == "error"]
    shown = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "step 1/1 p:" in shown and "/10 calls, passing 0" in shown  # the step's tqdm.auto bar
    assert "started (" not in shown  # (the plain lines of output that is not a terminal)
    assert "| step | kind | val score |" in shown and "best step: 0 (vanilla)" in shown


def test_shared_trainset_and_valset_are_warned_about_before_any_work(tokenizer, tmp_path):
    train, val, _ = iris.load_splits(0, (6, 4, 0))
    shared = val[:2] + train[2:]
    kwargs = dict(model=tiny_model(tokenizer), args=config(tmp_path), program=iris.program(), metric=iris.metric,
                  processing_class=tokenizer)
    with pytest.warns(UserWarning, match="2 of the 4 valset examples are also in the trainset"):
        BetterTogetherTrainer(trainset=shared, valset=val, **kwargs)
    with pytest.warns(UserWarning, match="6 of the 6 valset examples are also in the trainset"):
        BetterTogetherTrainer(trainset=train, valset=list(train), **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*also in the trainset")
        BetterTogetherTrainer(trainset=train, valset=val, **kwargs)


def test_tensorboard_results_png_and_bt_trl_evaluate(tokenizer, tmp_path, monkeypatch):
    # A tiny random model on disk, as a user's run has it (`bt-trl evaluate` finds the adapter's base model from the run
    # folder). Structured generation makes its answers parseable; a metric that passes them all gives the w step
    # traces to train on.
    model_dir = tmp_path / "tiny-random"
    tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    output_dir = tmp_path / "run"
    train, val, test = iris.load_splits(0, (6, 4, 4))
    trainer = BetterTogetherTrainer(
        model=str(model_dir),
        args=config(output_dir, strategy="w", report_to=["tensorboard"], generation_max_tokens=32),
        program=iris.program(), metric=lambda example, prediction, trace=None: True, trainset=train, valset=val,
        processing_class=tokenizer, peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    trainer.train()
    steps = json.loads((output_dir / "results.json").read_text())["steps"]
    assert steps[1]["traces_kept"] == 6  # the w step trained

    # TensorBoard: the bettertogether/* scalars of every step, against the BetterTogether step, in output_dir/runs
    # (transformers' TensorBoard callback files every logged value not of an evaluation under train/).
    assert not (workdir / "runs").exists()
    [log_dir] = (output_dir / "runs").iterdir()
    events = EventAccumulator(str(log_dir))
    events.Reload()
    val_scores = events.Scalars("train/bettertogether/val_score")
    assert [(e.step, e.value) for e in val_scores] == [(s["index"], pytest.approx(s["val_score"])) for s in steps]
    assert [(e.step, e.value) for e in events.Scalars("train/bettertogether/traces_kept")] == [(1, 6)]
    assert "train/loss" in events.Tags()["scalars"]  # the w step's own training logs go to the same place

    # results.png: an image of the run (val score by step, traces kept).
    image = imread(output_dir / "results.png")
    assert image.shape[0] > 200 and image.shape[1] > 300

    # bt-trl evaluate on the run folder: the run's program and weights, scored with the task's metric on the test
    # examples `bt-trl train` would have drawn, as the trainer's own program scores there.
    loaded = load_program(output_dir, program=iris.program())
    trained = trainer.program.deepcopy()
    for program in (loaded, trained):
        program.set_lm(None)
    assert loaded.dump_state() == trained.dump_state()
    expected = ProgramRunner(iris.metric).evaluate(trainer.program, test, trainer.program.predictors()[0].lm)
    assert bt_trl_main(["evaluate", str(output_dir), "--task", "iris", "--split", "test", "--train_size", "6",
                        "--val_size", "4", "--test_size", "4", "--generation_max_tokens", "32"]) == 0
    result = json.loads((output_dir / "evaluation_iris_test.json").read_text())
    assert (result["examples"], result["score"], result["parse_failures"]) == (4, expected.score, 0)
