"""bt_trl.lm from DSPy: DSPy's own weight optimizers (BootstrapFinetune, BetterTogether) fine-tune through bt_trl's
provider, on the tiny format model saved as a local model folder."""

import json
import re
from pathlib import Path

import dspy
import pytest
from dspy.teleprompt.grpo import GRPO
from safetensors.torch import load_file

import bt_trl
from bt_trl.integrations.dspy_lm import ENGINE_CLASS
from bt_trl.tasks import iris

TRAIN_KWARGS = {"num_train_epochs": 3, "learning_rate": 5e-3, "per_device_train_batch_size": 4, "lora_r": 8,
                "lora_alpha": 16}
PROBES = ["What is a flower?", "Name a color.", "Which species has the longest petals?", "Why?"]


@pytest.fixture
def model_dir(format_model, tokenizer, tmp_path):
    folder = tmp_path / "tiny"
    format_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def structured():
    with dspy.context(adapter=bt_trl.structured_adapter(dspy.ChatAdapter())):
        yield


def answers(lm, questions=PROBES):
    qa = dspy.Predict("question -> answer")
    qa.set_lm(lm)
    return [qa(question=q).answer for q in questions]


def finetuned_iris(model_dir, tmp_path):
    """The bt_trl LM, and Iris compiled by DSPy's BootstrapFinetune through its provider (8 flowers); 4 val flowers."""
    lm = bt_trl.lm(model_dir, max_tokens=48, output_dir=str(tmp_path / "versions"), train_kwargs=TRAIN_KWARGS)
    program = iris.program()
    program.set_lm(lm)
    train, val, _ = iris.load_splits(0, (8, 4, 0))
    compiled = dspy.BootstrapFinetune(metric=iris.metric, num_threads=8).compile(program, trainset=train)
    return lm, compiled, val


def test_bootstrap_finetune_serves_the_finetuned_weights(model_dir, tmp_path, structured):
    lm, compiled, val = finetuned_iris(model_dir, tmp_path)

    finetuned = compiled.predictors()[0].lm
    assert finetuned.engine is lm.engine and finetuned.provider.finetunable
    assert finetuned.model.startswith(lm.model + "-")  # a new name per weights version
    version = lm.engine.versions[finetuned.model]
    assert version.kind == "adapter"
    adapter = load_file(str(Path(version.folder) / "adapter_model.safetensors"))
    assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in adapter.items())
    # The same engine serves both versions; the fine-tuned one answers differently (a wrong version, or DSPy's
    # cache answering under the old name, would give the base's answers).
    assert answers(finetuned) != answers(lm)
    assert compiled(**val[0].inputs()).answer in iris.SPECIES
    assert lm.engine.stats.failed_requests == 0

    # kill frees the model; the next call loads the base and the adapter again, with the same answers.
    before = answers(finetuned)
    lm.kill()
    assert lm.engine._model is None
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    assert answers(finetuned) == before


def test_save_and_load_round_trip(model_dir, tmp_path, structured):
    lm, compiled, val = finetuned_iris(model_dir, tmp_path)
    path = tmp_path / "program.json"
    compiled.save(str(path))
    saved = json.loads(path.read_text())["predict"]["lm"]
    assert saved["engine"]["class"] == ENGINE_CLASS and saved["model"] == compiled.predictors()[0].lm.model

    loaded = bt_trl.load_dspy_program(path, iris.program())
    loaded_lm = loaded.predictors()[0].lm
    assert loaded_lm.model == compiled.predictors()[0].lm.model and loaded_lm.engine is not lm.engine
    assert loaded_lm.provider.finetunable
    assert answers(loaded_lm) == answers(compiled.predictors()[0].lm)
    assert [loaded(**e.inputs()).answer for e in val] == [compiled(**e.inputs()).answer for e in val]

    # DSPy's own loader refuses a custom engine unless told the file is trusted.
    with pytest.raises(ValueError, match="allow_unsafe_lm_state"):
        iris.program().load(str(path))
    trusted = iris.program()
    trusted.load(str(path), allow_unsafe_lm_state=True)
    assert answers(trusted.predictors()[0].lm) == answers(loaded_lm)

    # Only bt_trl.lm states are loaded: another engine class, or an unknown key, is refused before anything runs.
    original = path.read_text()
    for tamper in (lambda lm_state: lm_state["engine"].update({"class": "os:system"}),
                   lambda lm_state: lm_state.update({"api_base": "http://example.com"})):
        state = json.loads(original)
        tamper(state["predict"]["lm"])
        path.write_text(json.dumps(state))
        with pytest.raises(ValueError, match="not a bt_trl.lm"):
            bt_trl.load_dspy_program(path, iris.program())


def test_bad_finetune_input_fails_before_training(model_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown train_kwargs"):
        bt_trl.lm(model_dir, train_kwargs={"epochs": 3})
    lm = bt_trl.lm(model_dir, output_dir=str(tmp_path / "versions"))
    chat = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    for data, data_format, kwargs, error in (
        (chat, "completion", None, "chat data"),
        ([], "chat", None, "no training data"),
        ([{"messages": [{"role": "user", "content": "Hi"}]}], "chat", None, "ending with the assistant"),
        (chat, "chat", {"lora_rank": 4}, "unknown train_kwargs"),
    ):
        with pytest.raises(ValueError, match=error):
            lm.provider.finetune(None, lm.model, data, data_format, kwargs)
    assert list(lm.engine.versions) == [lm.model]


def test_full_finetuning(model_dir, tmp_path):
    lm = bt_trl.lm(model_dir, max_tokens=32, output_dir=str(tmp_path / "versions"))
    data = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Blue, always blue."}]}
            for q in PROBES]
    job = lm.finetune(data, "chat", {"use_peft": False, "num_train_epochs": 4, "learning_rate": 3e-3})
    finetuned = job.result()
    job.thread.join()
    assert lm.engine.versions[finetuned.model].kind == "full"
    assert (Path(lm.engine.versions[finetuned.model].folder) / "model.safetensors").is_file()
    assert finetuned("What is a flower?") != lm("What is a flower?")


def test_dspy_grpo_trains_through_the_reinforce_job(model_dir, tmp_path, structured):
    lm = bt_trl.lm(model_dir, max_tokens=48, temperature=1.0, output_dir=str(tmp_path / "versions"),
                   train_kwargs={"lora_r": 8, "lora_alpha": 16, "per_device_train_batch_size": 4})
    program = iris.program()
    program.set_lm(lm)
    train = iris.load_splits(0, (4, 0, 0))[0]

    def graded(example, prediction, trace=None):  # right answers first; among them, shorter reasoning better
        return iris.metric(example, prediction) - len(prediction.reasoning) / 1000

    base = lm.model
    jobs = []
    reinforce = lm.reinforce
    lm.reinforce = lambda train_kwargs: jobs.append(reinforce(train_kwargs)) or jobs[-1]  # to look at the job after
    optimizer = GRPO(metric=graded, num_train_steps=2, num_dspy_examples_per_grpo_step=2,
                          num_rollouts_per_grpo_step=4, exclude_demos=True, num_threads=4,
                          train_kwargs={"groups_per_step": 2, "learning_rate": 1e-3, "num_train_epochs": 1})
    compiled = optimizer.compile(program, trainset=train)

    (job,) = jobs
    assert job.steps == 2 and job.get_status()["status"] == "done"
    assert compiled.predictors()[0].lm is lm and lm.model != base  # DSPy's GRPO updates the LM in place
    version = lm.engine.versions[lm.model]
    assert version.kind == "adapter"
    adapter = load_file(str(Path(version.folder) / "adapter_model.safetensors"))
    assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in adapter.items())
    trained_versions = [name for name in lm.engine.versions if name != base]
    assert 1 <= len(trained_versions) <= 2 and len(lm.engine._adapter_names) == 1  # the replaced one is unloaded
    assert lm.engine.stats.failed_requests == 0


def test_bad_reinforce_input_fails_before_training(model_dir, tmp_path):
    greedy = bt_trl.lm(model_dir, output_dir=str(tmp_path / "versions"))
    with pytest.raises(ValueError, match="temperature above 0"):
        greedy.reinforce({})
    lm = bt_trl.lm(model_dir, temperature=1.0, output_dir=str(tmp_path / "versions"))
    for kwargs, error in (({"groups_per_step": 0}, "groups_per_step"), ({"lora_rank": 4}, "unknown train_kwargs")):
        with pytest.raises(ValueError, match=error):
            lm.reinforce(kwargs)
    job = lm.reinforce({})
    group = [{"messages": [{"role": "user", "content": "Hi"}], "completion": {"role": "assistant", "content": c},
              "reward": r} for c, r in (("Hello", 1.0), ("Bye", 0.0))]
    for data, data_format, error in (
        ([{"batch_id": 0, "group": group}], "chat", "GRPO chat groups"),
        ([{"batch_id": 0, "group": [{"messages": [], "reward": 1.0}]}], "grpo_chat", "is not a GRPO group"),
    ):
        with pytest.raises(ValueError, match=error):
            job.step(data, data_format)
    assert list(lm.engine.versions) == [lm.model]


def readme_snippet() -> str:
    """The first Python block of the docs page "Using bt_trl from DSPy"."""
    page = (Path(__file__).parent.parent / "docs" / "dspy.md").read_text()
    return re.search(r"```python\n(.*?)```", page, re.S).group(1)


def run_readme_snippet(model: str, folder: Path, monkeypatch) -> dict:
    """Runs the docs' snippet in `folder` with `model` in place of the embedded model; returns its variables."""
    code = readme_snippet()
    assert '"embedded:smollm2-135m"' in code
    monkeypatch.chdir(folder)
    monkeypatch.setenv("DSPY_FINETUNEDIR", str(folder / "finetune"))
    namespace = {}
    exec(compile(code.replace('"embedded:smollm2-135m"', repr(model)), "docs/dspy.md", "exec"), namespace)
    return namespace


def check_better_together_result(namespace: dict, folder: Path, output: str) -> None:
    best = namespace["best"]
    assert not best.flag_compilation_error_occurred
    candidates = best.candidate_programs
    assert sorted(c["strategy"] for c in candidates) == ["", "p", "p -> w", "p -> w -> p"]
    assert all(c["score"] is not None for c in candidates)
    assert [c["score"] for c in candidates] == sorted((c["score"] for c in candidates), reverse=True)
    by_strategy = {c["strategy"]: c["program"].predictors()[0].lm for c in candidates}
    assert by_strategy["p -> w"].model != by_strategy[""].model  # the w step's version
    assert by_strategy["p -> w -> p"].model == by_strategy["p -> w"].model
    assert (folder / "iris_program.json").is_file()
    assert namespace["loaded"].predictors()[0].lm.model == best.predictors()[0].lm.model
    assert "p -> w -> p" in output


def test_readme_snippet_better_together(model_dir, tmp_path, monkeypatch, capsys):
    """The docs' snippet, unchanged but for the model: the tiny one instead of the embedded one."""
    namespace = run_readme_snippet(model_dir, tmp_path, monkeypatch)
    check_better_together_result(namespace, tmp_path, capsys.readouterr().out)


def test_readme_snippet_on_the_embedded_model(tmp_path, monkeypatch, capsys):
    """The docs' snippet as it is: the embedded SmolLM2-135M-Instruct, Iris at the quick preset's size (minutes)."""
    namespace = run_readme_snippet("embedded:smollm2-135m", tmp_path, monkeypatch)
    check_better_together_result(namespace, tmp_path, capsys.readouterr().out)
