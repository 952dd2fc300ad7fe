"""Shared fixtures: the real SmolLM2 tokenizer, tiny random Llama models, and a tiny model taught the DSPy format.

A tiny random model only emits noise, which DSPy cannot parse. `format_model` is the same tiny architecture after a
short real SFT run on correctly formatted Iris answers (for the ChainOfThought program and for a two-module
program), so that a full BetterTogether run has parseable outputs, passing traces and real training to do.
"""

from __future__ import annotations

import copy

import datasets
import dspy
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from bt_trl.models import embedded_model_path
from bt_trl.tasks import iris


class TwoStepIris(dspy.Module):
    """Two modules on one LM: a size judgement, then the species from it."""

    def __init__(self):
        super().__init__()
        self.judge_size = dspy.Predict("petal_length: float, petal_width: float -> size: str")
        self.classify = dspy.Predict("size: str, sepal_length: float -> answer: str")

    def forward(self, petal_length, petal_width, sepal_length, sepal_width):
        size = self.judge_size(petal_length=petal_length, petal_width=petal_width).size
        return self.classify(size=size, sepal_length=sepal_length)


def size_of(example) -> str:
    return "small" if example.petal_length < 2.5 else "medium" if example.petal_length < 4.9 else "large"


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded_model_path())


def tiny_model(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config)


def formatted_rows(examples) -> list[dict]:
    """Gold answers of both test programs, formatted by DSPy's ChatAdapter exactly as at inference."""
    adapter = dspy.ChatAdapter()
    cot = iris.program().predict
    two = TwoStepIris()
    rows = []
    for ex in examples:
        calls = [
            (cot.signature, ex.inputs().toDict(), {"reasoning": "The petals decide it.", "answer": ex.answer}),
            (two.judge_size.signature, {"petal_length": ex.petal_length, "petal_width": ex.petal_width},
             {"size": size_of(ex)}),
            (two.classify.signature, {"size": size_of(ex), "sepal_length": ex.sepal_length}, {"answer": ex.answer}),
        ]
        for signature, inputs, outputs in calls:
            messages = adapter.format_finetune_data(signature, [], inputs, outputs)["messages"]
            rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return rows


@pytest.fixture(scope="session")
def format_model_state(tokenizer, tmp_path_factory):
    model = tiny_model(tokenizer)
    rows = formatted_rows(iris.load_examples())
    args = SFTConfig(
        output_dir=str(tmp_path_factory.mktemp("format_model")), max_steps=150, per_device_train_batch_size=8,
        learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=50, save_strategy="no", report_to="none",
        bf16=False, gradient_checkpointing=False, max_length=1024, seed=0,
    )
    SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
               processing_class=tokenizer).train()
    return copy.deepcopy(model.state_dict())


@pytest.fixture
def format_model(tokenizer, format_model_state):
    """A fresh copy of the tiny model that writes DSPy's format (each test may train it)."""
    model = tiny_model(tokenizer)
    model.load_state_dict(format_model_state)
    return model.eval()
