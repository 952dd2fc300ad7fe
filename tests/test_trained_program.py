"""The trained program behaves like the steps: `trainer.program` and `load_program` run a two-module program of the
user's own with the steps' adapter and generation settings, and an unparseable output raises one error naming the
module and field (an `AdapterParseError`, DSPy's convention), after one LM call."""

import dspy
import pytest
from conftest import TwoStepIris, tiny_model
from dspy.utils.exceptions import AdapterParseError
from peft import LoraConfig

from bt_trl import BetterTogetherConfig, BetterTogetherTrainer, load_program
from bt_trl.core.runner import ModuleParseError
from bt_trl.tasks import iris

SEED = 1  # the random base model, rebuilt identically for load_program


def train_random_model(tokenizer, output_dir, structured: bool):
    """A "p" run of TwoStepIris on a tiny random model (LabeledFewShot: a real DSPy optimizer with no LM calls)."""
    train, val, _ = iris.load_splits(0, (4, 3, 0))
    args = BetterTogetherConfig(str(output_dir), strategy="p", report_to="none", generation_max_tokens=24,
                                structured_generation=structured, num_threads=4, save_strategy="no", seed=0)
    trainer = BetterTogetherTrainer(
        model=tiny_model(tokenizer, seed=SEED), args=args, program=TwoStepIris(), metric=iris.metric,
        trainset=train, valset=val, processing_class=tokenizer, prompt_optimizer=dspy.LabeledFewShot(k=2),
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    trainer.train()
    return trainer, val


def test_trained_and_loaded_program_answer_as_the_steps_did(tokenizer, tmp_path):
    trainer, val = train_random_model(tokenizer, tmp_path, structured=True)
    # What the steps' runner gets (it parses every call: structured generation keeps the noise in format).
    with trainer.serving() as lm:
        steps = trainer.runner.run(trainer.program, val, lm)
    assert [call.error for call in steps] == [None] * len(val)
    expected = [call.prediction.answer for call in steps]

    # Called directly, outside any dspy.context: the same adapter, structured outputs and settings. Before, the call
    # went to DSPy's default ChatAdapter, unconstrained, and ended in its JSONAdapter fallback's parse error.
    direct = [trainer.program(**example.inputs()) for example in val]
    assert [p.answer for p in direct] == expected
    # A different adapter configured by the caller does not change how the trained program runs.
    with dspy.context(adapter=dspy.JSONAdapter()):
        assert trainer.program(**val[0].inputs()).answer == expected[0]

    loaded = load_program(tmp_path, program=TwoStepIris(), base_model=tiny_model(tokenizer, seed=SEED))
    assert [loaded(**example.inputs()).answer for example in val] == expected
    def prompts(program):
        return {name: (p.signature.instructions, p.demos) for name, p in program.named_predictors()}

    assert prompts(loaded) == prompts(trainer.program)  # the run's program, not the skeleton


def test_unparseable_output_names_the_module_and_field_after_one_call(tokenizer, tmp_path):
    trainer, val = train_random_model(tokenizer, tmp_path, structured=False)
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)  # count real generations below
    engine = trainer.program.judge_size.lm.engine
    calls_before = engine.stats.requests
    with pytest.raises(ModuleParseError) as raised:
        trainer.program(**val[0].inputs())
    error = raised.value
    assert isinstance(error, AdapterParseError)  # DSPy's convention: `except AdapterParseError` still catches it
    assert error.modules == ["judge_size"] and error.fields == ["size"]
    assert str(error).startswith("module 'judge_size': no parseable value for output field(s) 'size'")
    assert error.adapter_name == "ChatAdapter"
    assert engine.stats.requests == calls_before + 1  # no second call in another format

    loaded = load_program(tmp_path, program=TwoStepIris(), base_model=tiny_model(tokenizer, seed=SEED))
    with pytest.raises(ModuleParseError, match="module 'judge_size'"):
        loaded(**val[0].inputs())


def test_load_program_needs_the_users_own_adapter(tokenizer, tmp_path):
    class PoliteAdapter(dspy.ChatAdapter):
        pass

    with dspy.context(adapter=PoliteAdapter(use_json_adapter_fallback=False)):
        train_random_model(tokenizer, tmp_path, structured=True)
    with pytest.raises(ValueError, match="adapter PoliteAdapter, which is not one of DSPy's: pass adapter="):
        load_program(tmp_path, program=TwoStepIris(), base_model=tiny_model(tokenizer, seed=SEED))
    loaded = load_program(tmp_path, program=TwoStepIris(), base_model=tiny_model(tokenizer, seed=SEED),
                          adapter=PoliteAdapter(use_json_adapter_fallback=False))
    assert isinstance(loaded._served_adapter, PoliteAdapter)
