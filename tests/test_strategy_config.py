import sys

import pytest
from trl import TrlParser

from bt_trl import BetterTogetherConfig, parse_strategy


@pytest.mark.parametrize(
    "text, steps",
    [("p -> w -> p", ["p", "w", "p"]), ("p", ["p"]), ("w", ["w"]), ("p->w", ["p", "w"]), ("w -> p", ["w", "p"]),
     ("p -> p", ["p", "p"]), ("w -> w", ["w", "w"]), (" p ->w->  p -> w ", ["p", "w", "p", "w"])],
)
def test_parse_strategy(text, steps):
    assert parse_strategy(text) == steps


@pytest.mark.parametrize(
    "text, message",
    [("", "non-empty"), ("p -> x", "unknown step 'x' at position 2"), ("p -> -> w", "step 2 is empty"),
     ("pw", "separate steps with '->'"), ("p, w", "unknown step 'p, w'"), ("P -> w", "unknown step 'P'"),
     ("p -> w ->", "step 3 is empty")],
)
def test_parse_strategy_errors(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_strategy(text)


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="unknown step 'q r'"):
        BetterTogetherConfig(str(tmp_path), strategy="p -> q r")  # 'p -> q' waits for the trainer: q may be its own
    with pytest.raises(ValueError, match="w_step_init"):
        BetterTogetherConfig(str(tmp_path), w_step_init="restart")
    with pytest.raises(ValueError, match="num_threads"):
        BetterTogetherConfig(str(tmp_path), num_threads=0)
    with pytest.raises(ValueError, match="trace_rounds must be >= 1"):
        BetterTogetherConfig(str(tmp_path), trace_rounds=0)
    with pytest.raises(ValueError, match="max_rounds must be >= 1"):
        BetterTogetherConfig(str(tmp_path), max_rounds=0)
    # DSPy refuses calls sampled above temperature 2: every call of the step would fail at run time.
    for field, value in (("grpo_temperature", 0.0), ("grpo_temperature", 5.0), ("generation_temperature", 2.5),
                         ("generation_temperature", -1.0)):
        with pytest.raises(ValueError, match=f"{field} must be"):
            BetterTogetherConfig(str(tmp_path), **{field: value})


def test_config_defaults_follow_the_paper(tmp_path):
    config = BetterTogetherConfig(str(tmp_path))
    assert config.steps == ["p", "w", "p"]
    assert (config.max_bootstrapped_demos, config.max_labeled_demos, config.num_candidate_programs) == (3, 3, 6)
    assert config.completion_only_loss is True
    assert config.w_step_init == "continue"
    assert (config.max_rounds, config.trace_rounds) == (1, 1)  # one greedy attempt per example, as in the paper


def test_config_from_command_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [
        "train.py", "--output_dir", str(tmp_path), "--strategy", "w -> p", "--num_candidate_programs", "2",
        "--w_step_init", "base", "--input_columns", "question", "context", "--learning_rate", "3e-4",
    ])
    (config,) = TrlParser((BetterTogetherConfig,)).parse_args_and_config()
    assert config.steps == ["w", "p"]
    assert config.num_candidate_programs == 2
    assert config.w_step_init == "base"
    assert config.input_columns == ["question", "context"]
    assert config.learning_rate == 3e-4


def test_config_from_yaml_with_command_line_override(tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path}\nstrategy: 'p -> w'\nmax_labeled_demos: 5\ngeneration_max_tokens: 64\n"
        "metric_threshold: 0.5\n"
    )
    monkeypatch.setattr(sys, "argv", ["train.py", "--config", str(recipe), "--max_labeled_demos", "1"])
    (config,) = TrlParser((BetterTogetherConfig,)).parse_args_and_config()
    assert config.steps == ["p", "w"]
    assert config.max_labeled_demos == 1  # the command line wins over the file
    assert config.generation_max_tokens == 64
    assert config.metric_threshold == 0.5


def test_yaml_with_bad_strategy_fails_at_parse_time(tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path}\nstrategy: 'p => w'\n")
    monkeypatch.setattr(sys, "argv", ["train.py", "--config", str(recipe)])
    with pytest.raises(ValueError, match="unknown step 'p => w'"):
        TrlParser((BetterTogetherConfig,)).parse_args_and_config()
