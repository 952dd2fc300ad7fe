"""Shared fixtures: the real SmolLM2 tokenizer, tiny random Llama models, and a tiny model taught the DSPy format.

A tiny random model only emits noise, which DSPy cannot parse. `format_model` is the same tiny architecture after a
short real training run on correctly formatted Iris answers (for the ChainOfThought program and for a two-module
program), so that a full BetterTogether run has parseable outputs, passing traces and real training to do.
"""

from __future__ import annotations

import copy

import dspy
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from bt_trl.serving.models import embedded_model_path
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
    """Gold answers of both test programs, formatted by DSPy's ChatAdapter exactly as at inference. Half of the
    ChainOfThought rows carry two demos (labeled ones, as LabeledFewShot makes, or bootstrapped ones with reasoning),
    so the model also answers in format after a p step."""
    adapter = dspy.ChatAdapter()
    cot = iris.program().predict
    two = TwoStepIris()
    rows = []
    for i, ex in enumerate(examples):
        neighbours = [examples[(i + k) % len(examples)] for k in (1, 2)]
        demos = [] if i % 2 else [
            dict(d.toDict(), reasoning="The petals decide it.") if i % 4 else d.toDict() for d in neighbours
        ]
        calls = [
            (cot.signature, demos, ex.inputs().toDict(), {"reasoning": "The petals decide it.", "answer": ex.answer}),
            (two.judge_size.signature, [], {"petal_length": ex.petal_length, "petal_width": ex.petal_width},
             {"size": size_of(ex)}),
            (two.classify.signature, [], {"size": size_of(ex), "sepal_length": ex.sepal_length},
             {"answer": ex.answer}),
        ]
        for signature, call_demos, inputs, outputs in calls:
            messages = adapter.format_finetune_data(signature, call_demos, inputs, outputs)["messages"]
            rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return rows


def teach_format(model, tokenizer, rows, steps: int = 200, batch_size: int = 4, lr: float = 3e-3, seed: int = 0):
    """A plain torch SFT loop on the completions. With a 49k vocabulary and a 64-wide model, projecting only the
    completion positions onto the vocabulary makes each step ~7x cheaper than computing all the logits."""
    generator = torch.Generator().manual_seed(seed)
    encoded = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        completion = row["completion"][0]["content"] + tokenizer.eos_token
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        encoded.append((prompt_ids, completion_ids))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = [encoded[i] for i in torch.randint(len(encoded), (batch_size,), generator=generator).tolist()]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        targets = []
        for i, (p, c) in enumerate(batch):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
            targets += [(i, len(p) - 1 + j, token) for j, token in enumerate(c)]  # position t predicts t + 1
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        rows_idx, positions, labels = (torch.tensor(x) for x in zip(*targets))
        logits = model.lm_head(hidden[rows_idx, positions])
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return loss.item()


@pytest.fixture(scope="session")
def format_model_state(tokenizer):
    model = tiny_model(tokenizer)
    final_loss = teach_format(model, tokenizer, formatted_rows(iris.load_examples()))
    assert final_loss < 1.0, f"the tiny model did not learn DSPy's format (loss {final_loss:.2f})"
    return copy.deepcopy(model.state_dict())


@pytest.fixture
def format_model(tokenizer, format_model_state):
    """A fresh copy of the tiny model that writes DSPy's format (each test may train it)."""
    model = tiny_model(tokenizer)
    model.load_state_dict(format_model_state)
    return model.eval()


@pytest.fixture(autouse=True)
def fresh_dspy_cache():
    """Each test starts with an empty in-memory DSPy cache and no disk cache, so what a test asserts about
    generation is generated in that test (the same weights are served under the same LM name in every test)."""
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
    yield
