"""Structured generation: grammars from DSPy signatures, applied while generating (real models, real llguidance)."""

import enum
from typing import Literal

import dspy
import pydantic
import pytest
from conftest import TwoStepIris, tiny_model
from llguidance import LLMatcher
from llguidance.hf import from_tokenizer

from bt_trl.core.runner import ProgramRunner, program_adapter
from bt_trl.serving.engine import GenerationSettings, SamplingParams, TransformersBackend, serving_lm
from bt_trl.serving.structured import chat_fields_format, output_grammar, structured_adapter, writes_chat_fields
from bt_trl.tasks import iris


class Color(enum.Enum):
    RED = "red"
    DARK_BLUE = "dark blue"


class Box(pydantic.BaseModel):
    label: str
    sizes: list[int]


class EveryKind(dspy.Signature):
    """Every kind of output field."""

    question: str = dspy.InputField()
    reasoning: str = dspy.OutputField()
    choice: Literal["yes", "no", "maybe"] = dspy.OutputField()
    color: Color = dspy.OutputField()
    flag: bool = dspy.OutputField()
    count: int = dspy.OutputField()
    ratio: float = dspy.OutputField()
    tags: list[str] = dspy.OutputField()
    box: Box = dspy.OutputField()
    note: str = dspy.OutputField()


EVERY_KIND_VALUES = {
    "reasoning": "First [this], then that.\n\nA second paragraph.", "choice": "maybe", "color": Color.DARK_BLUE,
    "flag": False, "count": -42, "ratio": 3.25, "tags": ["a", "b c"], "box": Box(label="x", sizes=[1, 2]),
    "note": "done",
}


def accepts(tokenizer, grammar, text: str) -> bool:
    matcher = LLMatcher(from_tokenizer(tokenizer), LLMatcher.grammar_from_lark(grammar.lark), log_level=0)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


def test_grammar_accepts_what_chat_adapter_writes_and_nothing_off_format(tokenizer):
    adapter = dspy.ChatAdapter()
    grammar = output_grammar(chat_fields_format(EveryKind))
    # DSPy ends the message with a newline after the completion marker, where generation stops.
    written = adapter.format_assistant_message_content(EveryKind, EVERY_KIND_VALUES).removesuffix("\n")
    assert accepts(tokenizer, grammar, written)
    parsed = adapter.parse(EveryKind, written)
    assert parsed["color"] is Color.DARK_BLUE and parsed["box"] == EVERY_KIND_VALUES["box"]
    # Off format: a value outside the Literal, a header on the value's line, a header inside free text, a missing
    # field, a non-integer count.
    for wrong in (written.replace("\nmaybe\n", "\nperhaps\n"),
                  written.replace("## choice ## ]]\n", "## choice ## ]] "),
                  written.replace("A second paragraph.", "[[ ## note ## ]]\nsneaky"),
                  written.replace("[[ ## flag ## ]]\nFalse\n\n", ""),
                  written.replace("\n-42\n", "\n-42.5\n")):
        assert wrong != written and not accepts(tokenizer, grammar, wrong)


def test_only_chat_adapter_formats_get_the_chat_grammar():
    class Quieter(dspy.ChatAdapter):  # a user's subclass that keeps ChatAdapter's output format
        pass

    assert writes_chat_fields(dspy.ChatAdapter()) and writes_chat_fields(Quieter())
    assert not writes_chat_fields(dspy.JSONAdapter()) and not writes_chat_fields(dspy.XMLAdapter())
    structured = structured_adapter(Quieter(use_json_adapter_fallback=False))
    assert isinstance(structured, Quieter) and structured.use_json_adapter_fallback is False
    xml = dspy.XMLAdapter()
    assert structured_adapter(xml) is xml
    with pytest.raises(ValueError, match="unsupported response_format"):
        output_grammar({"type": "grammar", "grammar": "x"})


def run(model, tokenizer, program, examples, structured: bool, adapter=None, max_tokens=48):
    settings = GenerationSettings(max_tokens=max_tokens, structured=structured)
    with serving_lm(TransformersBackend(model.eval(), tokenizer), f"random-{structured}", settings) as lm, \
            dspy.context(adapter=adapter):
        calls = ProgramRunner(iris.metric, num_threads=8).run(program, examples, lm)
    return calls, lm.engine.stats


@pytest.mark.parametrize("program_kind", ["chain_of_thought", "two_modules", "json_adapter"])
def test_random_model_writes_parseable_outputs_under_constraints(tokenizer, program_kind):
    """A random-weight model emits noise; constrained, every call parses and every Literal answer is a species."""
    model = tiny_model(tokenizer, seed=1)
    examples = iris.load_examples()[::19]  # 8 flowers of every species
    program = TwoStepIris() if program_kind == "two_modules" else iris.program()
    adapter = dspy.JSONAdapter() if program_kind == "json_adapter" else None

    free, _ = run(model, tokenizer, program, examples, structured=False, adapter=adapter)
    assert sum(call.error == "parse" for call in free) >= len(examples) // 2  # unconstrained, noise does not parse

    calls, stats = run(model, tokenizer, program, examples, structured=True, adapter=adapter)
    assert [call.error for call in calls] == [None] * len(examples)
    if program_kind != "two_modules":  # TwoStepIris answers a free-text str
        assert all(call.prediction.answer in iris.SPECIES for call in calls)
    # Free text was closed within the budget: no call ran into its token limit before the answer.
    assert stats.requests == len(examples) * (2 if program_kind == "two_modules" else 1)


def test_batched_greedy_equals_unbatched_with_mixed_grammars(format_model, tokenizer):
    """Constrained and unconstrained rows, with different grammars, in one batch: each row is what greedy decoding
    gives it alone."""
    adapter = dspy.ChatAdapter()
    examples = iris.load_examples()[::37][:4]
    cot, two = iris.program().predict, TwoStepIris()
    calls = [(cot.signature, ex.inputs().toDict()) for ex in examples[:2]] + [
        (two.judge_size.signature, {"petal_length": ex.petal_length, "petal_width": ex.petal_width})
        for ex in examples[2:]
    ]
    prompts = [adapter.format(signature, demos=[], inputs=inputs) for signature, inputs in calls]
    grammars = [output_grammar(chat_fields_format(signature)) for signature, _ in calls]
    params = [SamplingParams(max_tokens=40, grammar=g if i != 1 else None) for i, g in enumerate(grammars)]
    backend = TransformersBackend(format_model, tokenizer)
    plain = TransformersBackend(format_model, tokenizer, min_shared_prefix=10**9)
    alone = [plain.generate([p], [q])[0].text for p, q in zip(prompts, params)]
    assert backend.generate(prompts, params) == plain.generate(prompts, params)
    assert [g.text for g in backend.generate(prompts, params)] == alone
    for (signature, _), text, param in zip(calls, alone, params):
        if param.grammar is not None:
            adapter.parse(signature, text)  # raises if it does not parse


def test_small_budget_closes_free_text_and_keeps_the_answer(tokenizer):
    """A free-text field is closed once only what the later fields need is left: with 40 tokens, the random model's
    reasoning stops in time for the answer's header and value."""
    model = tiny_model(tokenizer, seed=2)
    adapter = dspy.ChatAdapter()
    signature = iris.program().predict.signature
    prompt = adapter.format(signature, demos=[], inputs=iris.load_examples()[0].inputs().toDict())
    grammar = output_grammar(chat_fields_format(signature))
    for budget in (30, 40, 80):
        generation = TransformersBackend(model.eval(), tokenizer).generate(
            [prompt], [SamplingParams(max_tokens=budget, grammar=grammar)])[0]
        assert generation.completion_tokens <= budget
        assert adapter.parse(signature, generation.text)["answer"] in iris.SPECIES


def test_cache_never_mixes_constrained_and_unconstrained_answers(format_model, tokenizer):
    """The same call under the same LM name, constrained and not: DSPy's cache answers neither with the other."""
    example = iris.load_examples()[0]
    program = iris.program()
    backend = TransformersBackend(format_model.eval(), tokenizer)
    # The first two rounds generate; the repeats are served from the cache, each with its own kind of answer.
    counts = []
    for structured in (True, False, True, False):
        with serving_lm(backend, "same-name", GenerationSettings(max_tokens=40, structured=structured)) as lm, \
                dspy.context(lm=lm, adapter=program_adapter()):
            program(**example.inputs())
            counts.append(lm.engine.stats.requests)
    assert counts == [1, 1, 0, 0]
