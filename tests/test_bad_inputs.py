"""Bad inputs of every kind in issue 30, at each entry point they reach: each fails with a message naming the value and
saying what to do, before any model work; a metric's return type, which only a call shows, stops the run at the first
call. The models are tiny random ones; the program is a `Predict` with a `Literal` output, which structured generation
writes in a few tokens that parse."""

import json
import pickle

import pytest
from conftest import tiny_model
from dspy.clients.utils_finetune import TrainDataFormat
from trl import SFTTrainer

import bt_trl
from bt_trl import BetterTogetherCallback, BetterTogetherConfig, BetterTogetherTrainer
from bt_trl.cli import main
from bt_trl.core.results import STATE_FILE, RunState, StepResult
from bt_trl.core.runner import MetricValueError
from bt_trl.serving.models import check_model_name_or_path
from bt_trl.tasks import iris, iris_predict


def config(output_dir, strategy="w", **overrides):
    values = dict(strategy=strategy, report_to="none", num_candidate_programs=0, max_bootstrapped_demos=1,
                  max_labeled_demos=1, generation_max_tokens=24, num_threads=4, num_train_epochs=1,
                  per_device_train_batch_size=2, save_strategy="no", gradient_checkpointing=False, use_cpu=True,
                  disable_tqdm=True)
    values.update(overrides)
    return BetterTogetherConfig(str(output_dir), **values)


def splits():
    train, val, _ = iris.load_splits(0, (2, 2, 0))
    return train, val


def trainer_on(tokenizer, args, metric=iris.metric, model=None):
    train, val = splits()
    return BetterTogetherTrainer(model=model or tiny_model(tokenizer), args=args, program=iris_predict.program(),
                                 metric=metric, trainset=train, valset=val, processing_class=tokenizer)


def callback_trainer(tokenizer, args, metric=iris.metric):
    train, val = splits()
    callback = BetterTogetherCallback(iris_predict.program(), metric, train, val)
    return SFTTrainer(model=tiny_model(tokenizer), args=args, train_dataset=callback.train_dataset,
                      processing_class=tokenizer, callbacks=[callback])


@pytest.fixture
def model_dir(tokenizer, tmp_path):
    folder = tmp_path / "tiny"
    tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def says_yes(example, prediction, trace=None):
    return "yes"


# 1. A metric returning something that is not a score stops the run at its first call, naming the value.
@pytest.mark.parametrize("entry", ["trainer", "callback"])
def test_a_metric_returning_a_string_stops_the_run_at_its_first_call(entry, tokenizer, tmp_path):
    if entry == "trainer":  # step 0 scores the valset: the runner's first call
        run = trainer_on(tokenizer, config(tmp_path), metric=says_yes).train
    else:  # the callback's first p step: DSPy's bootstrapping and the candidates' scoring
        run = callback_trainer(tokenizer, config(tmp_path, max_steps=1), metric=says_yes).train
    with pytest.raises(MetricValueError, match="the metric returned 'yes' \\(str\\); a metric must return a bool"):
        run()


# 2. max_length below every prompt: the w step names max_length and the shortest prompt instead of the dataloader's
# "num_samples=0".
@pytest.mark.parametrize("entry", ["trainer", "bt_trl.lm"])
def test_max_length_below_every_prompt_is_named_at_the_w_step(entry, tokenizer, tmp_path, model_dir):
    message = r"max_length=16 is shorter than every prompt of the \d+ training rows \(the shortest is \d+ tokens\)"
    if entry == "trainer":
        trainer = trainer_on(tokenizer, config(tmp_path, max_length=16), metric=lambda e, p, trace=None: True)
        with pytest.raises(ValueError, match=message):
            trainer.train()
    else:
        lm = bt_trl.lm(str(model_dir), device="cpu", output_dir=str(tmp_path / "versions"))
        messages = [{"role": "user", "content": "Which species has petals of 1.4 cm?"},
                    {"role": "assistant", "content": "setosa"}]
        job = lm.finetune([{"messages": messages}], TrainDataFormat.CHAT,
                          {"max_length": 16, "use_cpu": True, "gradient_checkpointing": False})
        assert isinstance(job.result(), ValueError)
        with pytest.raises(ValueError, match=message):
            raise job.result()


# 3. A program file that is not JSON (a pickle, text) names itself and what it should be.
@pytest.mark.parametrize("content", [pickle.dumps({"predict": "state"}), b"predict: {demos: []}\n"],
                         ids=["pickle", "not JSON"])
@pytest.mark.parametrize("loader", ["load_program", "load_dspy_program"])
def test_a_program_file_that_is_not_json_names_itself(loader, content, tmp_path):
    (tmp_path / "program.json").write_bytes(content)
    expected = rf"{tmp_path / 'program.json'} should be a DSPy JSON program file.*, but it is not "
    with pytest.raises(ValueError, match=expected):
        if loader == "load_program":
            bt_trl.load_program(tmp_path, program=iris.program())
        else:
            bt_trl.load_dspy_program(tmp_path / "program.json", iris.program())


# 4. A local path that does not exist is never taken for a Hub id; Hub ids and embedded names still pass.
@pytest.mark.parametrize("entry", ["load_program", "bt-trl evaluate", "trainer model=", "bt_trl.lm", "bt-trl train"])
def test_a_missing_local_path_is_not_taken_for_a_hub_id(entry, tokenizer, tmp_path):
    missing = str(tmp_path / "runs" / "iris_quick")
    expected = f"'{missing}' does not exist: no local folder runs/iris_quick in {tmp_path}"
    with pytest.raises(FileNotFoundError, match=expected):
        if entry == "load_program":
            bt_trl.load_program(missing, program=iris.program())
        elif entry == "bt-trl evaluate":
            main(["evaluate", missing, "--task", "iris", "--output_dir", str(tmp_path / "eval")])
        elif entry == "trainer model=":
            trainer_on(tokenizer, config(tmp_path), model=missing)
        elif entry == "bt_trl.lm":
            bt_trl.lm(missing)
        else:
            main(["train", "--model_name_or_path", missing, "--output_dir", str(tmp_path / "out")])
    check_model_name_or_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    check_model_name_or_path("embedded:smollm2-135m")


# 5. Split sizes: a negative size is not a slice, and a size the task cannot fill is not silently cut.
@pytest.mark.parametrize(("command", "flags", "expected"), [
    ("train", ["--train_size", "-1"], "train_size must be >= 1 .*got -1"),
    ("train", ["--val_size", "0"], "val_size must be >= 1 .*got 0"),
    ("train", ["--train_size", "60"], "train_size 60: task 'iris' has 50 train examples"),
    ("reproduce", ["--test_size", "-5"], "test_size must be >= 0 .*got -5"),
    ("evaluate", ["some/run", "--test_size", "80"], "test_size 80: task 'iris' has 50 test examples"),
])
def test_split_sizes_are_checked_before_any_model_work(command, flags, expected, tmp_path):
    out = ["--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=expected):
        main([command, *flags, "--task", "iris", *out])


# 6. A new run into the output_dir of another run: refused, or with overwrite_output_dir that run is removed first.
def test_a_new_run_into_another_runs_output_dir_is_refused_unless_overwritten(tokenizer, tmp_path):
    old_step = StepResult(index=1, kind="p", val_score=50.0, weights_version=0, weights_dir="step_0_vanilla",
                          lm_name="old")
    RunState(["p", "w"], [old_step, old_step]).save(tmp_path)
    (tmp_path / "step_1_p").mkdir()
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ValueError, match=f"output_dir {tmp_path} holds a BetterTogether run \\(p -> w, 1 step\\(s\\) "
                                         "done\\).*--resume_from_checkpoint True.*overwrite_output_dir=True"):
        trainer_on(tokenizer, config(tmp_path)).train()
    assert (tmp_path / STATE_FILE).exists()  # refused: nothing removed

    # Overwritten: the old run's files are gone before the new run's first call (which this metric stops).
    with pytest.raises(MetricValueError):
        trainer_on(tokenizer, config(tmp_path, overwrite_output_dir=True), metric=says_yes).train()
    assert not any((tmp_path / name).exists() for name in (STATE_FILE, "step_1_p", "results.json"))


# 7. A p step allowed no demos cannot change the program.
@pytest.mark.parametrize("entry", ["config", "bt-trl train", "callback"])
def test_a_p_step_without_demos_is_refused(entry, tokenizer, tmp_path):
    no_demos = dict(max_bootstrapped_demos=0, max_labeled_demos=0)
    expected = "max_bootstrapped_demos=0 and max_labeled_demos=0: the p step chooses few-shot demos"
    with pytest.raises(ValueError, match=expected):
        if entry == "config":
            config(tmp_path, strategy="p -> w", **no_demos)
        elif entry == "bt-trl train":
            main(["train", "--strategy", "w -> p", "--max_bootstrapped_demos", "0", "--max_labeled_demos", "0",
                  "--output_dir", str(tmp_path)])
        else:  # the callback runs p steps whatever the config's strategy
            callback_trainer(tokenizer, config(tmp_path, strategy="w", max_steps=1, **no_demos)).train()
    config(tmp_path, strategy="w", **no_demos)  # no p step: nothing to refuse


# 8. evaluate_program before train() has no program to score.
def test_evaluate_program_before_train_asks_for_a_program(tokenizer, tmp_path):
    trainer = trainer_on(tokenizer, config(tmp_path))
    with pytest.raises(ValueError, match="no program to score yet; call train\\(\\) first, or pass program="):
        trainer.evaluate_program(splits()[1])


# 9. Faults the run survives are named: the w step's warning counts the errors; a threshold above every metric value
# is mentioned.
def test_survived_faults_are_named(tokenizer, tmp_path):
    def raises(example, prediction, trace=None):
        raise KeyError("label")

    with pytest.warns(UserWarning, match="2 tried, 0 passed the metric, 0 unparseable, 2 metric errors, 0 program "
                                         "errors; the errors are in run.log"):
        trainer_on(tokenizer, config(tmp_path / "raises"), metric=raises).train()

    def half(example, prediction, trace=None):
        return 0.5

    with pytest.warns(UserWarning, match="no trace to train on"):
        trainer_on(tokenizer, config(tmp_path / "threshold", metric_threshold=0.9), metric=half).train()
    log = (tmp_path / "threshold" / "run.log").read_text()
    assert "no program call reached metric_threshold=0.9 (the metric's highest value was 0.5)" in log
    assert json.loads((tmp_path / "threshold" / "results.json").read_text())["steps"][0]["val_score"] == 0.0
