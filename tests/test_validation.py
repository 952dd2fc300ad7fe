"""Bad input is rejected with a message naming it, before any model is loaded: the model id given here does not
exist, so reaching the model-loading code would fail differently."""

import datasets
import dspy
import pytest

from bt_trl import BetterTogetherConfig, BetterTogetherTrainer
from bt_trl.tasks import iris

MISSING_MODEL = "/nonexistent/model/never-loaded"


@pytest.fixture
def args(tmp_path):
    return BetterTogetherConfig(str(tmp_path), report_to="none")


def make(args, **overrides):
    train, val, _ = iris.load_splits(0, (4, 4, 0))
    kwargs = dict(model=MISSING_MODEL, args=args, program=iris.program(), metric=iris.metric,
                  trainset=train, valset=val)
    kwargs.update(overrides)
    return BetterTogetherTrainer(**kwargs)


def test_empty_trainset(args):
    with pytest.raises(ValueError, match="trainset is empty"):
        make(args, trainset=[])


def test_empty_valset(args):
    with pytest.raises(ValueError, match="valset is empty"):
        make(args, valset=[])


def test_metric_not_callable(args):
    with pytest.raises(TypeError, match="metric must be callable.*'accuracy'"):
        make(args, metric="accuracy")


def test_metric_with_wrong_arity(args):
    with pytest.raises(TypeError, match="metric 'one_arg' must accept"):
        def one_arg(example):
            return True
        make(args, metric=one_arg)


def test_program_not_a_module(args):
    with pytest.raises(TypeError, match="program must be a dspy.Module, got str"):
        make(args, program="iris")


def test_example_without_inputs_marked(args):
    bare = dspy.Example(petal_length=1.0, petal_width=0.2, sepal_length=5.0, sepal_width=3.0, answer="setosa")
    with pytest.raises(ValueError, match=r"trainset\[0\] has no inputs marked"):
        make(args, trainset=[bare])


def test_example_missing_an_input(args):
    partial = dspy.Example(petal_length=1.0, petal_width=0.2, answer="setosa").with_inputs("petal_length",
                                                                                            "petal_width")
    with pytest.raises(ValueError, match=r"valset\[0\] lacks the program's input\(s\) \['sepal_length', "
                                         r"'sepal_width'\]"):
        make(args, valset=[partial])


def test_dataset_needs_input_columns(args):
    table = datasets.Dataset.from_list([{"petal_length": 1.0, "answer": "setosa"}])
    with pytest.raises(ValueError, match="set `input_columns`"):
        make(args, trainset=table)


def test_dataset_with_unknown_input_column(tmp_path):
    args = BetterTogetherConfig(str(tmp_path), report_to="none", input_columns=["petal_length", "stem_length"])
    table = datasets.Dataset.from_list([{"petal_length": 1.0, "answer": "setosa"}])
    with pytest.raises(ValueError, match=r"input columns \['stem_length'\] not in"):
        make(args, trainset=table)


def test_train_dataset_is_refused(args):
    with pytest.raises(TypeError, match="pass trainset instead"):
        make(args, train_dataset=datasets.Dataset.from_list([{"text": "x"}]))


def test_dataset_with_input_columns_is_accepted_up_to_model_loading(tmp_path):
    columns = ["petal_length", "petal_width", "sepal_length", "sepal_width"]
    args = BetterTogetherConfig(str(tmp_path), report_to="none", input_columns=columns)
    train, _, _ = iris.load_splits(0, (4, 0, 0))
    table = datasets.Dataset.from_list([ex.toDict() for ex in train])
    # Valid data gets past validation: the next thing checked is the model's path, which does not exist.
    with pytest.raises(FileNotFoundError, match=f"model '{MISSING_MODEL}' does not exist"):
        make(args, trainset=table, valset=table)
