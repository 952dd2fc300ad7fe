"""The embedded SmolLM2-135M-Instruct through a reduced Iris p -> w -> p (the slowest test: a few minutes)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dspy
import torch
from peft import LoraConfig
from transformers import AutoTokenizer

from bt_trl import EMBEDDED_MODEL, BetterTogetherConfig, BetterTogetherTrainer
from bt_trl.serving.models import embedded_model_path
from bt_trl.tasks import iris

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_model_p_w_p_on_reduced_iris(tmp_path):
    train, val, _ = iris.load_splits(0, (10, 6, 0))
    args = BetterTogetherConfig(
        str(tmp_path), strategy="p -> w -> p", report_to="none", num_candidate_programs=0,
        max_bootstrapped_demos=1, max_labeled_demos=3, generation_max_tokens=80, num_threads=8,
        num_train_epochs=2, per_device_train_batch_size=4, learning_rate=2e-4, logging_steps=1,
        save_strategy="no", gradient_checkpointing=False, max_length=1024, seed=0, weight_step_keep_start=False,
    )
    trainer = BetterTogetherTrainer(
        model=EMBEDDED_MODEL, args=args, program=iris.program(), metric=iris.metric, trainset=train, valset=val,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
    )
    trainer.train()

    results = json.loads((tmp_path / "results.json").read_text())
    kinds = [s["kind"] for s in results["steps"]]
    assert kinds == ["vanilla", "p", "w", "p"]
    w = results["steps"][2]
    assert w["traces_kept"] > 0 and w["first_loss"] is not None and len(w["val_curve"]) == 3
    assert "| 3 | p |" in (tmp_path / "results.md").read_text()

    # A p step keeps the best of its candidates on the valset, the zero-shot program among them (with structured
    # generation it parses and can win): the first one never scores below the vanilla program. Demos come from the
    # trainset.
    steps = results["steps"]
    assert steps[1]["val_score"] >= steps[0]["val_score"]
    train_inputs = [ex.inputs().toDict() for ex in train]
    for step in ("step_1_p", "step_3_p"):
        program = json.loads((tmp_path / step / "program.json").read_text())
        for demo in program["predict"]["demos"]:
            assert {k: demo[k] for k in train_inputs[0]} in train_inputs

    # The trained adapter changes what the model outputs, compared with the base weights.
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    prompt = dspy.ChatAdapter().format(iris.program().predict.signature, demos=[],
                                       inputs=val[0].inputs().toDict())
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    model = trainer.model
    trainer._load_weights("step_2_w")
    model.eval()
    with torch.no_grad():
        trained = model(**ids).logits
        with model.disable_adapter():
            base = model(**ids).logits
    assert (trained - base).abs().max() > 1e-2


def test_embedded_model_zero_shot_iris_parses_every_answer(tmp_path):
    """Unconstrained, the 135M model writes a Python function instead of the fields on every flower (30/30
    unparseable); with structured generation (the default) every answer parses, right or wrong."""
    train, val, _ = iris.load_splits(0, (4, 12, 0))
    args = BetterTogetherConfig(str(tmp_path), strategy="p", report_to="none", generation_max_tokens=80,
                                num_threads=12)
    trainer = BetterTogetherTrainer(model=EMBEDDED_MODEL, args=args, program=iris.program(), metric=iris.metric,
                                    trainset=train, valset=val)
    summary = trainer.evaluate_program(val, iris.program())
    assert summary.total == len(val) and summary.parse_failures == 0, summary
    assert summary.program_errors == 0


def test_users_two_module_program_gets_traces_and_a_trained_adapter(tmp_path):
    """The README's API example with a program of the user's own (`scripts/own_program.py`, run as a user runs it):
    the w step keeps passing traces, pools both modules' calls into its SFT data and trains a LoRA adapter on the
    embedded model, and the kept program routes a test ticket."""
    command = [sys.executable, str(ROOT / "scripts" / "own_program.py"), "--model_name_or_path", EMBEDDED_MODEL,
               "--output_dir", str(tmp_path), "--strategy", "w", "--train_size", "6", "--val_size", "3",
               "--test_size", "3", "--use_peft", "--lora_r", "8", "--lora_alpha", "16",
               "--lora_target_modules", "all-linear", "--generation_max_tokens", "96", "--num_threads", "8",
               "--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--save_strategy", "no",
               "--max_length", "1024", "--report_to", "none", "--seed", "0",
               "--weight_step_keep_start", "False"]
    env = dict(os.environ, DSPY_CACHEDIR=str(tmp_path / "dspy_cache"))
    done = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    w = json.loads((tmp_path / "results.json").read_text())["steps"][1]
    assert w["kind"] == "w" and w["parse_failures"] == 0 and w["traces_kept"] > 0 and w["first_loss"] is not None
    rows = [json.loads(line) for line in (tmp_path / "step_1_w" / "sft_dataset.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * w["traces_kept"]  # both modules' calls of every kept run
    completions = [row["completion"][0]["content"] for row in rows]
    assert sum("[[ ## summary ## ]]" in c for c in completions) == sum("[[ ## team ## ]]" in c for c in completions)
    assert (tmp_path / "step_1_w" / "adapter_model.safetensors").exists()
    assert re.search(r"test score: [\d.]+ \(\d/3 passing\)", done.stdout), done.stdout[-2000:]
