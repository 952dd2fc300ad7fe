import threading

import dspy
import pytest
import torch
from peft import LoraConfig, get_peft_model

from bt_trl.engine import (
    BatchingEngine, GenerationSettings, SamplingParams, TransformersBackend, lm_name, serving_lm, weights_fingerprint,
)
from bt_trl.tasks import iris


def iris_prompts(n, demos=3):
    train, val, _ = iris.load_splits(0)
    program = dspy.LabeledFewShot(k=demos).compile(iris.program(), trainset=train)
    predictor = program.predict
    adapter = dspy.ChatAdapter()
    return [adapter.format(predictor.signature, demos=predictor.demos, inputs=ex.inputs().toDict())
            for ex in val[:n]]


def test_batched_greedy_equals_unbatched(format_model, tokenizer):
    prompts = iris_prompts(5)
    params = SamplingParams(max_tokens=40)
    shared = TransformersBackend(format_model, tokenizer)  # reuses the demos' KV cache across rows
    plain = TransformersBackend(format_model, tokenizer, min_shared_prefix=10**9)
    one_by_one = [plain.generate([p], params)[0] for p in prompts]
    for backend in (shared, plain):
        batched = backend.generate(prompts, params)
        assert [g.text for g in batched] == [g.text for g in one_by_one]
    assert all("[[ ## answer ## ]]" in g.text for g in one_by_one)  # the format model answers in DSPy's format
    # Generation stops at the completion marker, which (OpenAI-style) is not part of the text.
    assert all(g.finish_reason == "stop" and "completed" not in g.text for g in one_by_one)
    assert all(g.completion_tokens < 40 and g.prompt_tokens > 100 for g in one_by_one)


class RecordingBackend:
    """The real backend, recording the batches it is asked for."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []
        self.lock = threading.Lock()

    def generate(self, prompts, params):
        with self.lock:
            self.calls.append((len(prompts), params))
        return self.backend.generate(prompts, params)


def test_concurrent_dspy_calls_are_batched(format_model, tokenizer):
    backend = RecordingBackend(TransformersBackend(format_model, tokenizer))
    _, val, _ = iris.load_splits(0, (0, 8, 0))
    settings = GenerationSettings(max_tokens=48, max_batch_size=8, batch_wait=0.2)
    with serving_lm(backend, "test-batching", settings) as lm:
        lm.cache = False
        with dspy.context(lm=lm):
            result = dspy.Evaluate(devset=val, metric=iris.metric, num_threads=8, display_progress=False)(
                iris.program())
        stats = lm.engine.stats
        assert stats.requests == 8
        assert stats.batches < 8 and max(n for n, _ in backend.calls) > 1
        assert stats.completion_tokens > 0
        usage = lm.history[-1]["usage"]
        assert usage["completion_tokens"] > 0 and usage["prompt_tokens"] > 100
    assert len(result.results) == 8


def test_sampling_parameters_and_n_are_honoured(format_model, tokenizer):
    backend = RecordingBackend(TransformersBackend(format_model, tokenizer))
    with serving_lm(backend, "test-params", GenerationSettings(max_tokens=16)) as lm:
        lm.cache = False
        outputs = lm("Say hi", n=3, temperature=0.9, max_tokens=7)
        assert len(outputs) == 3
        assert {params for _, params in backend.calls} == {SamplingParams(max_tokens=7, temperature=0.9)}
        assert len(lm.history[-1]["outputs"]) == 3
        greedy = lm("Say hi")
        assert backend.calls[-1][1] == SamplingParams(max_tokens=16, temperature=0.0)
        assert isinstance(greedy[0], str)


def test_backend_errors_reach_the_caller_and_the_engine_survives(format_model, tokenizer):
    class Failing:
        def __init__(self):
            self.fail = True

        def generate(self, prompts, params):
            if self.fail:
                raise RuntimeError("device lost")
            return TransformersBackend(format_model, tokenizer).generate(prompts, params)

    backend = Failing()
    engine = BatchingEngine(backend, max_batch_size=2)
    lm = dspy.LM("bt_trl/test-errors", engine=engine, num_retries=0, cache=False, max_tokens=8)
    with pytest.raises(Exception, match="device lost"):
        lm("hello")
    backend.fail = False
    assert isinstance(lm("hello")[0], str)
    engine.close()


def test_new_lm_name_per_weights_version(format_model):
    model = get_peft_model(format_model, LoraConfig(r=4, target_modules="all-linear"))
    base = weights_fingerprint(model, only_trainable=False)
    first = lm_name(model, base)
    assert lm_name(model, base) == first  # same weights, same name: cached answers stay valid
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    saved = lora_b.detach().clone()
    with torch.no_grad():
        lora_b.add_(0.01)
    trained = lm_name(model, base)
    assert trained != first
    with torch.no_grad():
        lora_b.copy_(saved)
    assert lm_name(model, base) == first
    # A different base model gives another name even with identical adapters.
    assert lm_name(model, "another-base") != first
