import importlib.util
import threading
import time

import dspy
import pytest
import torch
from conftest import tiny_model
from peft import LoraConfig, get_peft_model

from bt_trl import BetterTogetherConfig, BetterTogetherTrainer
from bt_trl.serving.engine import (
    BatchingEngine,
    GenerationSettings,
    SamplingParams,
    TransformersBackend,
    _common_prefix_length,
    encode_chats,
    lm_name,
    serving_lm,
    weights_fingerprint,
)
from bt_trl.serving.vllm import VLLMBackend
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
    one_by_one = [plain.generate([p], [params])[0] for p in prompts]
    for backend in (shared, plain):
        batched = backend.generate(prompts, [params] * len(prompts))
        assert [g.text for g in batched] == [g.text for g in one_by_one]
    assert all("[[ ## answer ## ]]" in g.text for g in one_by_one)  # the format model answers in DSPy's format
    # Generation stops at the completion marker, which (OpenAI-style) is not part of the text.
    assert all(g.finish_reason == "stop" and "completed" not in g.text for g in one_by_one)
    assert all(g.completion_tokens < 40 and g.prompt_tokens > 100 for g in one_by_one)


def test_repeated_prompts_are_encoded_once_and_sampled_apart(format_model, tokenizer):
    """A GRPO group's rows (one prompt, several samples) share the prompt's encoding: each distinct prompt is encoded
    once after the batch's shared prefix; greedy rows still give exactly what they give alone, sampled rows differ."""
    prompts = iris_prompts(2)
    greedy = SamplingParams(max_tokens=40)
    backend = TransformersBackend(format_model, tokenizer)
    alone = [backend.generate([p], [greedy])[0].text for p in prompts]
    rows = [prompts[0]] * 3 + [prompts[1]] * 3
    encoded = []  # the tokens of each forward pass

    def record(module, args, kwargs):
        encoded.append(kwargs["input_ids"].numel())

    hook = format_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        together = backend.generate(rows, [greedy] * 6)
        decode_steps = len(encoded) - 3
        torch.manual_seed(0)
        sampled = backend.generate(rows, [SamplingParams(max_tokens=30, temperature=5.0)] * 6)
    finally:
        hook.remove()
    assert [g.text for g in together] == [alone[0]] * 3 + [alone[1]] * 3
    tokens = [len(row) for row in encode_chats(tokenizer, prompts)]
    shared = _common_prefix_length(encode_chats(tokenizer, prompts))
    width = shared + max(tokens) - shared
    # The shared prefix once, each distinct prompt's rest (but its last token) once, then the rows token by token.
    assert encoded[:3] == [shared, 2 * (width - 1 - shared), 6] and set(encoded[3 : 3 + decode_steps]) == {6}
    assert len({g.text for g in sampled[:3]}) > 1 and len({g.text for g in sampled[3:]}) > 1


class RecordingBackend:
    """The real backend, recording the batches it is asked for."""

    def __init__(self, backend):
        self.backend, self.calls, self.prompts = backend, [], []
        self.lock = threading.Lock()

    def generate(self, prompts, params):
        with self.lock:
            self.calls.append((len(prompts), params))
            self.prompts.append(prompts)
        return self.backend.generate(prompts, params)


def test_mixed_sampling_parameters_in_one_batch(format_model, tokenizer):
    """Greedy and sampled rows, with different token limits, generated together: each row follows its own settings
    and greedy rows are exactly what greedy decoding gives them alone."""
    prompts = iris_prompts(4)
    params = [SamplingParams(max_tokens=40), SamplingParams(max_tokens=30, temperature=5.0),
              SamplingParams(max_tokens=6), SamplingParams(max_tokens=30, temperature=5.0, top_p=0.5)]
    backend = TransformersBackend(format_model, tokenizer)
    alone = [backend.generate([prompt], [p])[0] for prompt, p in zip(prompts, params)]
    torch.manual_seed(0)
    together = backend.generate(prompts, params)
    for row in (0, 2):
        assert together[row].text == alone[row].text
        assert together[row].completion_tokens == alone[row].completion_tokens
    assert together[2].completion_tokens == 6 and together[2].finish_reason == "length"
    # At temperature 5 the tiny model's samples leave the greedy path within a few tokens.
    greedy_of_sampled = backend.generate([prompts[1], prompts[3]], [SamplingParams(max_tokens=30)] * 2)
    assert together[1].text != greedy_of_sampled[0].text and together[3].text != greedy_of_sampled[1].text
    assert all(g.completion_tokens <= p.max_tokens for g, p in zip(together, params))


def test_row_sampling_processor():
    """Each row's own temperature and top-p; greedy rows keep only their argmax."""
    from bt_trl.serving.engine import _RowSampling

    probs = torch.tensor([[0.15, 0.5, 0.3, 0.05]] * 3)
    params = [SamplingParams(max_tokens=1), SamplingParams(max_tokens=1, temperature=1.0, top_p=0.7),
              SamplingParams(max_tokens=1, temperature=2.0)]
    out = _RowSampling(params, "cpu")(None, probs.log())
    assert torch.isfinite(out).tolist() == [[False, True, False, False], [False, True, True, False], [True] * 4]
    assert torch.allclose(out[1, 1:3].softmax(-1), torch.tensor([0.5, 0.3]) / 0.8)
    assert torch.allclose(out[2].softmax(-1), (probs[2].log() / 2).softmax(-1))


def test_different_stop_strings_need_separate_calls(format_model, tokenizer):
    backend = TransformersBackend(format_model, tokenizer)
    with pytest.raises(ValueError, match="same stop strings"):
        backend.generate(iris_prompts(2), [SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, stop=("x",))])


def test_concurrent_dspy_calls_are_batched(format_model, tokenizer):
    backend = RecordingBackend(TransformersBackend(format_model, tokenizer))
    _, val, _ = iris.load_splits(0, (0, 8, 0))
    settings = GenerationSettings(max_tokens=48, max_batch_size=8, batch_wait=0.2)
    with serving_lm(backend, "test-batching", settings) as lm:
        lm.cache = False
        started = time.perf_counter()
        with dspy.context(lm=lm):
            result = dspy.Evaluate(devset=val, metric=iris.metric, num_threads=8, display_progress=False)(
                iris.program())
        stats = lm.engine.stats
        assert 0 < stats.forward_seconds < time.perf_counter() - started  # the model's own share of the calls' time
        assert stats.requests == 8
        assert stats.batches < 8 and max(n for n, _ in backend.calls) > 1
        assert all(len(params) == n for n, params in backend.calls)
        assert stats.completion_tokens > 0
        usage = lm.history[-1]["usage"]
        assert usage["completion_tokens"] > 0 and usage["prompt_tokens"] > 100
    assert len(result.results) == 8


def test_batches_hold_one_programs_requests(format_model, tokenizer):
    """Requests of two programs (different system prompts) arriving interleaved are generated one program per batch,
    so that each batch's shared prefix covers the program's whole prompt."""
    backend = RecordingBackend(TransformersBackend(format_model, tokenizer))
    requests = [(system, f"Flower {i}?") for i in range(4) for system in ("You know flowers.", "You know trees.")]
    with serving_lm(backend, "test-grouping", GenerationSettings(max_tokens=4, max_batch_size=4, batch_wait=1.0)) as lm:
        lm.cache = False
        threads = []
        for system, question in requests:  # arrive in this order, well within batch_wait of each other
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            threads.append(threading.Thread(target=lm, kwargs={"messages": messages}))
            threads[-1].start()
            time.sleep(0.05)
        for t in threads:
            t.join()
    assert [len(prompts) for prompts in backend.prompts] == [4, 4]
    assert [{p[0]["content"] for p in prompts} for prompts in backend.prompts] == [
        {"You know flowers."}, {"You know trees."}]


def test_requests_with_different_settings_share_a_batch(format_model, tokenizer):
    backend = RecordingBackend(TransformersBackend(format_model, tokenizer))
    settings = [dict(temperature=0.0, max_tokens=12), dict(temperature=0.8, max_tokens=9),
                dict(temperature=0.0, max_tokens=5), dict(temperature=1.3, max_tokens=7)]
    outputs = [None] * len(settings)
    with serving_lm(backend, "test-mixed", GenerationSettings(max_batch_size=4, batch_wait=2.0)) as lm:
        lm.cache = False
        barrier = threading.Barrier(len(settings))

        def call(i):
            barrier.wait()
            outputs[i] = lm("Name a flower.", **settings[i])[0]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(settings))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(backend.calls) == 1  # one batch, not one per temperature / max_tokens
        size, params = backend.calls[0]
        assert size == 4 and {(p.temperature, p.max_tokens) for p in params} == {
            (s["temperature"], s["max_tokens"]) for s in settings}
    messages = [{"role": "user", "content": "Name a flower."}]
    for i in (0, 2):
        alone = backend.backend.generate([messages], [SamplingParams(max_tokens=settings[i]["max_tokens"])])[0]
        assert outputs[i] == alone.text


def test_sampling_parameters_and_n_are_honoured(format_model, tokenizer):
    backend = RecordingBackend(TransformersBackend(format_model, tokenizer))
    with serving_lm(backend, "test-params", GenerationSettings(max_tokens=16)) as lm:
        lm.cache = False
        outputs = lm("Say hi", n=3, temperature=0.9, max_tokens=7)
        assert len(outputs) == 3
        assert {p for _, params in backend.calls for p in params} == {SamplingParams(max_tokens=7, temperature=0.9)}
        assert len(lm.history[-1]["outputs"]) == 3
        greedy = lm("Say hi")
        assert backend.calls[-1][1] == [SamplingParams(max_tokens=16, temperature=0.0)]
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


def test_vllm_backend_is_refused_before_any_model_work(tmp_path, tokenizer):
    vllm_installed = importlib.util.find_spec("vllm") is not None
    if vllm_installed and torch.cuda.is_available():
        pytest.skip("vLLM can run on this machine")
    args = BetterTogetherConfig(output_dir=str(tmp_path), generation_backend="vllm")  # checked when training starts
    train, val, _ = iris.load_splits(0, (2, 2, 0))
    with pytest.raises(ValueError, match="generation_backend='vllm' cannot run here") as refused:
        BetterTogetherTrainer(model="no/such-model", args=args, program=iris.program(), metric=iris.metric,
                              trainset=train, valset=val)
    assert ("pip install 'bt_trl[vllm]'" in str(refused.value)) != vllm_installed
    assert ("no CUDA GPU" in str(refused.value)) != torch.cuda.is_available()
    with pytest.raises(ValueError, match="cannot run here"):  # the backend itself checks too
        VLLMBackend(tiny_model(tokenizer), tokenizer)
    with pytest.raises(ValueError, match="generation_backend must be one of"):
        BetterTogetherConfig(output_dir=str(tmp_path), generation_backend="tgi")
    assert BetterTogetherConfig(output_dir=str(tmp_path)).generation_backend == "transformers"
