"""Named steps (issue 26): built-in prompt steps `gepa`, `mipro`, `simba`, the weight step's second name `sft`, the
user's own prompt optimizers, and the errors for bad names, all before any model work. The last tests run `gepa` and
`mipro` on the embedded SmolLM2-135M at a tiny budget, through the trainer and through the callback."""

import json
import sys

import dspy
import pytest
from peft import LoraConfig
from trl import SFTTrainer, TrlParser

from bt_trl import EMBEDDED_MODEL, BetterTogetherCallback, BetterTogetherConfig, BetterTogetherTrainer
from bt_trl.cli import main
from bt_trl.core.results import RunState, StepResult, step_dirs
from bt_trl.serving.models import embedded_model_path
from bt_trl.steps.optimizers import TeleprompterSpec, built_in_specs, named_prompt_optimizers
from bt_trl.steps.prompt import compiled_and_teacher
from bt_trl.steps.strategy import is_prompt_step, is_weight_step, parse_strategy
from bt_trl.tasks import iris, iris_predict


def config(output_dir, strategy="p -> w -> p", **overrides):
    values = dict(strategy=strategy, report_to="none", num_candidate_programs=0, max_bootstrapped_demos=1,
                  max_labeled_demos=1, generation_max_tokens=24, num_threads=4, num_train_epochs=1,
                  per_device_train_batch_size=2, save_strategy="no", gradient_checkpointing=False, use_cpu=True,
                  disable_tqdm=True)
    return BetterTogetherConfig(str(output_dir), **{**values, **overrides})


def trainer_on(args, model=EMBEDDED_MODEL, **kwargs):
    """The trainer on the embedded model; the construction errors tested here come before it is loaded."""
    train, val, _ = iris.load_splits(0, (4, 3, 0))
    return BetterTogetherTrainer(model=model, args=args, program=iris_predict.program(), metric=iris.metric,
                                 trainset=train, valset=val, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Names and kinds (no model)
# ------------------------------------------------------------------------------------------------------------------

def test_built_in_names_parse_and_have_kinds():
    assert parse_strategy("gepa -> sft -> mipro -> w -> simba -> p") == ["gepa", "sft", "mipro", "w", "simba", "p"]
    assert [is_weight_step(s) for s in ("w", "sft", "p", "gepa", "mine")] == [True, True, False, False, False]
    assert not is_prompt_step("vanilla") and is_prompt_step("mine") and not is_prompt_step("sft")
    assert parse_strategy("mine -> w", prompt_steps={"mine"}) == ["mine", "w"]
    assert parse_strategy("anything_1 -> w", prompt_steps=None) == ["anything_1", "w"]


@pytest.mark.parametrize("strategy, prompt_steps, message", [
    ("p -> mine", (), "unknown step 'mine' at position 2; known steps: 'p' = .*'gepa' = .*'sft' = "),
    ("pwp", (), r"unknown step 'pwp' at position 1 \(separate steps with '->'\)"),
    ("p -> theirs", {"mine"}, "unknown step 'theirs'.*'mine' = a prompt optimizer of yours.*prompt_optimizers="),
    ("p -> my-step", None, "unknown step 'my-step'"),
])
def test_unknown_names_are_refused_naming_the_known_ones(strategy, prompt_steps, message):
    with pytest.raises(ValueError, match=message):
        parse_strategy(strategy, prompt_steps=prompt_steps)


def test_config_takes_names_and_optimizer_specs(tmp_path):
    args = config(tmp_path, strategy="gepa -> sft -> mine",
                  prompt_optimizers='{"mine": {"class": "MIPROv2", "auto": "medium"}}')  # as the command line gives it
    assert args.steps == ["gepa", "sft", "mine"]
    assert args.prompt_optimizers == {"mine": {"class": "MIPROv2", "auto": "medium"}}
    # p given by name: the default p's demo counts no longer apply.
    config(tmp_path, prompt_optimizers={"p": {"class": "GEPA", "auto": "light"}}, max_bootstrapped_demos=0,
           max_labeled_demos=0)
    for bad, message in [({"w": {"class": "GEPA"}}, "'w' names a weight step, not a prompt optimizer"),
                         ({"my-step": {}}, "step name 'my-step' must be letters"),
                         ({"vanilla": {}}, "'vanilla' names step 0"),
                         (["gepa"], "prompt_optimizers must be a mapping")]:
        with pytest.raises(ValueError, match=message):
            config(tmp_path, prompt_optimizers=bad)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "unknown step 'mine' at position 1"),
    ({"prompt_optimizers": {"sft": dspy.LabeledFewShot(k=1)}}, "'sft' names a weight step"),
    ({"prompt_optimizers": {"mine": dspy.BootstrapFinetune(metric=iris.metric)}},
     "BootstrapFinetune is not a prompt optimizer; the weight step is 'w'"),
    ({"prompt_optimizers": {"mine": "GEPA"}}, "must be a DSPy Teleprompter, a factory"),
    ({"prompt_optimizers": {"mine": {"class": "os.system"}}}, "class 'os.system' is not a DSPy prompt optimizer; "
                                                                "choose one of .*GEPA.*MIPROv2"),
    ({"prompt_optimizers": {"mine": {"class": "BootstrapFinetune"}}}, "is not a DSPy prompt optimizer"),
    ({"prompt_optimizers": {"mine": {"class": "dspy.GEPA", "budget": 3}}}, "GEPA takes no argument budget"),
    ({"prompt_optimizers": {"mine": {"class": "GEPA", "metric": "x"}}}, "takes no argument metric here"),
    ({"prompt_optimizers": {"mine": {"auto": "light"}}}, "prompt_optimizers\\['mine'\\] names no class"),
    ({"prompt_optimizers": {"p": dspy.LabeledFewShot(k=1)}, "prompt_optimizer": dspy.LabeledFewShot(k=2)},
     "'p' is given twice"),
])
def test_trainer_refuses_bad_names_before_loading_the_model(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        trainer_on(config(tmp_path, strategy="mine -> w"), model="no/such-model", **kwargs)


def test_a_name_in_the_config_and_the_trainer_is_refused(tmp_path):
    args = config(tmp_path, strategy="mine", prompt_optimizers={"mine": {"class": "GEPA", "auto": "light"}})
    with pytest.raises(ValueError, match=r"\['mine'\] are given both"):
        trainer_on(args, model="no/such-model", prompt_optimizers={"mine": dspy.LabeledFewShot(k=1)})


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt_step": "w"}, "prompt_step='w' is a weight step; it must name a prompt step: 'p', 'gepa'"),
    ({"prompt_step": "mine"}, "prompt_step='mine' is not a known prompt step"),
    ({"prompt_step": "mine", "prompt_optimizers": {"mine": {"class": "Nope"}}}, "class 'Nope' is not a DSPy"),
])
def test_callback_refuses_bad_names_at_construction(kwargs, message):
    train, val, _ = iris.load_splits(0, (4, 3, 0))
    with pytest.raises(ValueError, match=message):
        BetterTogetherCallback(iris_predict.program(), iris.metric, train, val, **kwargs)


def test_specs_build_around_the_served_lm():
    lm = dspy.LM("openai/served", api_key="unused")  # never called: the optimizers only hold it
    defaults = built_in_specs(train_size=4)
    gepa = TeleprompterSpec.parse("gepa", {"max_metric_calls": 5}, defaults["gepa"])
    assert gepa.kwargs == {"max_metric_calls": 5}  # a budget given replaces the default auto="light"
    built = gepa.bound(iris.metric, num_threads=3, metric_threshold=None)(lm)
    assert (built.reflection_lm, built.max_metric_calls, built.auto, built.num_threads) == (lm, 5, None, 3)
    example = iris.load_splits(0, (1, 1, 0))[0][0]
    assert built.metric_fn(example, dspy.Prediction(answer=example.answer), None, "predict", None) == 1.0

    optimizers = named_prompt_optimizers({"mipro": {"auto": None, "num_candidates": 2, "num_trials": 3}}, None,
                                         defaults)
    assert optimizers["mipro"].compile_kwargs == {"num_trials": 3}  # only MIPROv2.compile takes it
    mipro = optimizers["mipro"].bound(iris.metric, 2, 0.5)(lm)
    assert (mipro.prompt_model, mipro.task_model, mipro.auto, mipro.metric_threshold) == (lm, lm, None, 0.5)
    assert optimizers["simba"].bound(iris.metric, 2, None)(lm).bsize == 4  # no larger than the trainset
    other = TeleprompterSpec.parse("mine", {"class": "dspy.teleprompt.GEPA", "auto": "light",
                                            "reflection_lm": "openai/other"}).bound(iris.metric, 2, None)(lm)
    assert other.reflection_lm.model == "openai/other"


def test_what_a_prompt_step_compiles():
    original, current = dspy.Predict("a -> b"), dspy.Predict("a -> b")
    bootstrap = dspy.BootstrapFewShot(metric=iris.metric)
    assert compiled_and_teacher(bootstrap, original, current, after_prompt_step=True) == (original, current)
    assert compiled_and_teacher(bootstrap, original, current, after_prompt_step=False) == (original, None)
    gepa = dspy.GEPA(metric=lambda *args: 1.0, auto="light", reflection_lm=dspy.LM("openai/x", api_key="unused"))
    assert compiled_and_teacher(gepa, original, current, after_prompt_step=True) == (current, None)


def test_step_folders_carry_the_name_and_old_runs_still_load(tmp_path):
    for name in ("step_0_vanilla", "step_1_p", "step_2_sft", "step_3_gepa", "step_4_my_opt2", "not_a_step"):
        (tmp_path / name).mkdir()
    assert sorted(p.name for p in step_dirs(tmp_path)) == ["step_0_vanilla", "step_1_p", "step_2_sft", "step_3_gepa",
                                                           "step_4_my_opt2"]
    old = StepResult(index=1, kind="w", val_score=50.0, weights_version=1, weights_dir="step_1_w", lm_name="old")
    RunState(["w"], [old]).save(tmp_path)
    assert RunState.load(tmp_path).steps[0].name == "step_1_w"


# ------------------------------------------------------------------------------------------------------------------
# gepa and mipro on the embedded model, tiny budgets: they run (not: they improve)
# ------------------------------------------------------------------------------------------------------------------

# GEPA: the valset once, then one reflection round on a mini-batch of 3 (3 calls, a reflection, 3 calls). MIPROv2:
# two candidate demo sets and instructions, two trials on the whole valset (compile arguments).
TINY = {"gepa": {"max_metric_calls": 9},
        "mipro": {"auto": None, "num_candidates": 2, "num_trials": 2, "minibatch": False,
                  "max_bootstrapped_demos": 1, "max_labeled_demos": 1}}


@pytest.mark.parametrize("name", ["gepa", "mipro"])
def test_named_prompt_step_through_the_trainer(name, tmp_path):
    args = config(tmp_path, strategy=name, prompt_optimizers={name: TINY[name]})
    trainer = trainer_on(args)
    trainer.train()

    results = json.loads((tmp_path / "results.json").read_text())
    assert [s["kind"] for s in results["steps"]] == ["vanilla", name]
    assert results["steps"][1]["program_calls"] > 3  # the optimizer's calls, besides scoring the 3 val examples
    assert (tmp_path / f"step_1_{name}" / "program.json").exists()
    assert f"| 1 | {name} |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("name", ["gepa", "mipro"])
def test_named_prompt_step_through_the_callback(name, tmp_path):
    train, val, _ = iris.load_splits(0, (4, 3, 0))
    callback = BetterTogetherCallback(iris_predict.program(), iris.metric, train, val, prompt_step=name,
                                      prompt_optimizers={name: TINY[name]})
    args = config(tmp_path, max_steps=1_000, learning_rate=1e-4)
    trainer = SFTTrainer(model=str(embedded_model_path()), args=args, train_dataset=callback.train_dataset,
                         peft_config=LoraConfig(r=4, target_modules="all-linear"), callbacks=[callback])
    trainer.train()
    assert [h["epoch"] for h in callback.history] == [0, 1]  # a round when training began and after the epoch
    assert callback.history[0]["traces_kept"] > 0


def test_a_recipe_names_optimizers_and_bt_trl_train_checks_them_first(tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path}\nstrategy: 'mine -> w -> gepa'\nprompt_optimizers:\n"
                      "  mine: {class: dspy.MIPROv2, auto: medium}\n  gepa: {max_metric_calls: 50}\n")
    monkeypatch.setattr(sys, "argv", ["train.py", "--config", str(recipe)])
    (args,) = TrlParser((BetterTogetherConfig,)).parse_args_and_config()
    assert args.steps == ["mine", "w", "gepa"]
    assert args.prompt_optimizers == {"mine": {"class": "dspy.MIPROv2", "auto": "medium"},
                                      "gepa": {"max_metric_calls": 50}}
    with pytest.raises(ValueError, match="unknown step 'theirs' at position 2"):
        main(["train", "--config", str(recipe), "--strategy", "mine -> theirs", "--task", "gsm8k",
              "--data_path", str(tmp_path / "no_data")])  # refused before the task's data is read
