"""The LM engine: DSPy program calls served from the live model being trained.

Two layers, so that the generation backend can change (batched transformers here, vLLM in `vllm.py`)
without touching DSPy or the trainer:

* `GenerationBackend` — the one small interface: a batch of chat prompts + one `SamplingParams` each in, one
  `Generation` per prompt out. `TransformersBackend` implements it with `model.generate` on the live model.
* `BatchingEngine` — a DSPy 3.4 custom engine (`dspy.LM(..., engine=...)`, the supported extension point; the
  `BaseLM.forward` override is deprecated). DSPy calls `complete(Request)` from many threads at once; a single
  worker thread gathers the requests that arrive together into micro-batches for the backend.

`serving_lm(backend, name)` ties them together into a `dspy.LM`. DSPy caches answers by model name, so every
weights version must be served under its own name (see `weights_fingerprint`).
"""

from __future__ import annotations

import copy
import hashlib
import queue
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import dspy
import torch
from dspy.lm15 import Message, Response, TextPart, Usage
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from bt_trl.serving.settings import GenerationSettings
from bt_trl.serving.structured import COMPLETION_MARKER, GrammarConstraint, OutputGrammar, output_grammar

# DSPy LM names of served weights are LM_PREFIX + the weights' name (see lm_name).
LM_PREFIX = "bt_trl/"


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    grammar: OutputGrammar | None = None  # structured generation: the output format the text must follow


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    # this row's share of its batch's time in the model's forward passes: a measurement, not part of what was generated
    forward_seconds: float = field(default=0.0, compare=False)


class GenerationBackend(Protocol):
    """Generates one completion per chat prompt, each with its own `SamplingParams` (`params[i]` for `prompts[i]`).
    Called from one thread at a time."""

    def generate(self, prompts: Sequence[list[dict]], params: Sequence[SamplingParams]) -> list[Generation]: ...


class TransformersBackend:
    """Batched `generate` on an in-process transformers (or PEFT) model, with the tokenizer's chat template.

    The caller owns the model's mode: it must be in eval mode with the KV cache usable (see
    `BetterTogetherTrainer.generation_mode`) and must not change the weights while this backend is in use.

    Rows of one batch may differ in temperature, top-p, max tokens and output grammar (a logits processor keeps each
    row inside its own grammar, another samples each row with its own settings, greedy rows take the argmax; a
    stopping criterion ends each row at its own token limit). They share stop strings: transformers checks one set
    for the whole batch (`BatchingEngine` groups requests by them).

    Prompt prefixes are reused: the requests of one candidate program share a long prefix (system prompt and demos),
    and on CPU prefill dominates generation. The longest prefix common to a batch is encoded once (and kept for the
    next batches with the same prefix); each row then only encodes its own suffix, laid out as
    `[prefix][padding][suffix]` with the padding masked, so positions continue from the prefix. Rows that repeat a
    prompt (the samples of one GRPO group) share its encoding too: each distinct prompt is encoded once and its KV
    cache repeated for its rows, which then sample on their own.
    """

    def __init__(self, model, tokenizer, stop_strings: Sequence[str] = (COMPLETION_MARKER,),
                 min_shared_prefix: int = 16, cached_prefixes: int = 4):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.min_shared_prefix = min_shared_prefix
        self.cached_prefixes = cached_prefixes
        self._prefix_cache: OrderedDict[tuple[int, ...], DynamicCache] = OrderedDict()

    def generate(self, prompts: Sequence[list[dict]], params: Sequence[SamplingParams]) -> list[Generation]:
        if len(params) != len(prompts) or len({p.stop for p in params}) > 1:
            raise ValueError("one SamplingParams per prompt is needed, all with the same stop strings")
        tok = self.tokenizer
        rows = encode_chats(tok, prompts)
        shared = min(_common_prefix_length(rows), min(len(r) for r in rows) - 1)
        if shared < self.min_shared_prefix:
            shared = 0
        prefix = rows[0][:shared]
        suffix_width = max(len(r) - shared for r in rows)
        pad = tok.pad_token_id
        input_ids = [prefix + [pad] * (suffix_width - len(r) + shared) + r[shared:] for r in rows]
        attention = [[1] * shared + [0] * (suffix_width - len(r) + shared) + [1] * (len(r) - shared) for r in rows]
        device = self.model.device
        kwargs = {}
        stop = tuple(dict.fromkeys(self.stop_strings + params[0].stop))
        limits = [p.max_tokens for p in params]
        if len(set(limits)) > 1:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_RowTokenLimits(len(input_ids[0]), limits, device)])
        processors = LogitsProcessorList()
        if any(p.grammar is not None for p in params):  # first: greedy and sampled rows choose among allowed tokens
            processors.append(GrammarConstraint(
                [p.grammar for p in params], limits, tok, self.model.config.get_text_config().vocab_size,
                _eos_token_ids(self.model, tok), prompt_width=len(input_ids[0]),
            ))
        sampling = {"do_sample": False}
        if any(p.temperature > 0 for p in params):
            # Built-in warpers are neutral (temperature 1, top-p 1, no top-k); _RowSampling applies each row's own.
            sampling = {"do_sample": True, "temperature": 1.0, "top_p": 1.0}
            processors.append(_RowSampling(params, device))
        with torch.no_grad(), _ForwardTimer(self.model) as timer:
            distinct = list(dict.fromkeys(map(tuple, input_ids)))
            if len(distinct) < len(rows) and shared < len(input_ids[0]) - 1:
                kwargs["cache"] = self._repeated_prompts_kv(input_ids, attention, distinct, prefix)
            elif shared:
                kwargs["cache"] = self._prefix_kv(tuple(prefix), len(rows))
            out = self.model.generate(
                input_ids=torch.tensor(input_ids, device=device),
                attention_mask=torch.tensor(attention, device=device),
                max_new_tokens=max(limits),
                stop_strings=list(stop) or None,
                tokenizer=tok,
                pad_token_id=pad,
                top_k=None,
                # The caller materializes every parameter (see BetterTogetherTrainer.generation_mode), so ranks
                # generate independently; transformers' ZeRO-3 default would make each step a collective.
                synced_gpus=False,
                logits_processor=processors,
                **sampling,
                **kwargs,
            )
        new_tokens = out[:, len(input_ids[0]) :].tolist()
        eos_ids = _eos_token_ids(self.model, tok) | {pad}  # generate() pads finished rows with it
        results = []
        for tokens, row, limit in zip(new_tokens, rows, limits):
            tokens = tokens[:limit]  # rows stopped at their own limit are padded up to the batch's longest
            eos_at = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
            end = len(tokens) if eos_at is None else eos_at + 1
            text = tok.decode(tokens[:end], skip_special_tokens=True)
            # generate() stops a row at a stop string but keeps it; the OpenAI convention DSPy expects drops it.
            cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
            results.append(
                Generation(
                    text=text[:cut] if cut >= 0 else text,
                    prompt_tokens=len(row),
                    completion_tokens=end,
                    finish_reason="stop" if eos_at is not None or cut >= 0 else "length",
                    forward_seconds=timer.seconds / len(rows),
                )
            )
        return results

    def _repeated_prompts_kv(self, input_ids: list[list[int]], attention: list[list[int]],
                             distinct: list[tuple[int, ...]], prefix: list[int]) -> DynamicCache:
        """The KV cache of every row's prompt but its last token (generate() encodes that one per row, so that each
        row samples on its own), encoding each of the `distinct` padded prompts once, after the batch's shared
        `prefix`, with the positions generate() gives them."""
        device = self.model.device
        rows = [tuple(row) for row in input_ids]
        ids = torch.tensor(distinct, device=device)
        mask = torch.tensor([attention[rows.index(row)] for row in distinct], device=device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        shared, width = len(prefix), ids.shape[1]
        cache = self._prefix_kv(tuple(prefix), len(distinct)) if prefix else DynamicCache()
        self.model(input_ids=ids[:, shared : width - 1], attention_mask=mask[:, : width - 1],
                   position_ids=positions[:, shared : width - 1], cache=cache, use_cache=True)
        cache.batch_select_indices(torch.tensor([distinct.index(row) for row in rows], device=device))
        return cache

    def _prefix_kv(self, prefix: tuple[int, ...], batch_size: int) -> DynamicCache:
        """The KV cache of `prefix`, repeated for `batch_size` rows (a copy: generate() extends it in place)."""
        cache = self._prefix_cache.get(prefix)
        if cache is None:
            with torch.no_grad():
                ids = torch.tensor([prefix], device=self.model.device)
                cache = self.model(input_ids=ids, use_cache=True, cache=DynamicCache()).past_key_values
            self._prefix_cache[prefix] = cache
            while len(self._prefix_cache) > self.cached_prefixes:
                self._prefix_cache.popitem(last=False)
        self._prefix_cache.move_to_end(prefix)
        batch_cache = copy.deepcopy(cache)
        batch_cache.batch_repeat_interleave(batch_size)
        return batch_cache


class _ForwardTimer:
    """Adds up the time spent in the forward passes of `model` (the innermost causal LM under a PEFT wrapper) while
    the block runs: the engine reports it as the share of program calls' time that is the model's own."""

    def __init__(self, model):
        self.module = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.seconds = 0.0
        self._started = 0.0

    def __enter__(self) -> _ForwardTimer:
        self._hooks = [self.module.register_forward_pre_hook(self._start),
                       self.module.register_forward_hook(self._stop)]
        return self

    def __exit__(self, *exc_info) -> None:
        for hook in self._hooks:
            hook.remove()

    def _start(self, module, args) -> None:
        self._started = time.perf_counter()

    def _stop(self, module, args, output) -> None:
        if output.logits.is_cuda:  # kernels run asynchronously: the pass ends when they do
            torch.cuda.synchronize(output.logits.device)
        self.seconds += time.perf_counter() - self._started


class _RowTokenLimits(StoppingCriteria):
    """Ends each row once it has generated its own `max_tokens` (generate() only knows one limit per batch)."""

    def __init__(self, prompt_width: int, limits: list[int], device):
        self.prompt_width = prompt_width
        self.limits = torch.tensor(limits, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return (input_ids.shape[1] - self.prompt_width) >= self.limits


class _RowSampling(LogitsProcessor):
    """Per-row temperature and top-p. Greedy rows (temperature 0) keep only their argmax, so sampling picks exactly
    the token greedy decoding would."""

    def __init__(self, params: Sequence[SamplingParams], device):
        self.greedy = torch.tensor([p.temperature <= 0 for p in params], device=device)
        self.temperature = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params],
                                        device=device).unsqueeze(1)
        self.top_p = torch.tensor([p.top_p or 1.0 for p in params], device=device).unsqueeze(1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        argmax_only = torch.full_like(scores, float("-inf")).scatter(-1, scores.argmax(-1, keepdim=True), 0.0)
        scores = scores / self.temperature
        # top-p: keep the smallest set of most likely tokens whose probability reaches the row's top_p
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        sorted_drop = probs.cumsum(dim=-1) - probs >= self.top_p
        drop = torch.zeros_like(sorted_drop).scatter(-1, order, sorted_drop)
        return torch.where(self.greedy.unsqueeze(1), argmax_only, scores.masked_fill(drop, float("-inf")))


def encode_chats(tokenizer, prompts: Sequence[list[dict]]) -> list[list[int]]:
    """Token ids of each chat prompt under the tokenizer's chat template, ending with the assistant turn's opening."""
    texts = [tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True) for p in prompts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _common_prefix_length(rows: list[list[int]]) -> int:
    first = rows[0]
    length = min(len(r) for r in rows)
    for row in rows[1:]:
        length = next((i for i in range(length) if row[i] != first[i]), length)
    return length


def _eos_token_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


class _Stop:
    """Tells the worker thread `worker` to stop (`BatchingEngine.close`)."""

    def __init__(self, worker: threading.Thread):
        self.worker = worker


@dataclass
class _Pending:
    messages: list[dict]
    params: SamplingParams
    model: str  # the DSPy LM name the request was made under (one weights version)
    future: Future = field(default_factory=Future)


@dataclass
class EngineStats:
    requests: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failed_requests: int = 0  # requests whose generation raised (the error went to the caller)
    forward_seconds: float = 0.0  # time in the model's forward passes (the backends that measure it)

    def snapshot(self) -> EngineStats:
        return EngineStats(self.requests, self.batches, self.prompt_tokens, self.completion_tokens,
                           self.failed_requests, self.forward_seconds)

    def add(self, other: EngineStats) -> None:
        self.requests += other.requests
        self.batches += other.batches
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.failed_requests += other.failed_requests
        self.forward_seconds += other.forward_seconds

    def count(self, generations: Sequence[Generation]) -> None:
        """Adds one backend call that produced `generations`."""
        self.requests += len(generations)
        self.batches += 1
        self.prompt_tokens += sum(g.prompt_tokens for g in generations)
        self.completion_tokens += sum(g.completion_tokens for g in generations)
        self.forward_seconds += sum(g.forward_seconds for g in generations)


class BatchingEngine:
    """DSPy custom engine that micro-batches concurrent requests onto a `GenerationBackend`.

    A worker thread takes the first waiting request, keeps adding requests until none has arrived for `batch_wait`
    seconds (or `max_waiting` are waiting) and generates up to `max_batch_size` of them in one backend call, each with
    its own temperature, top-p and max tokens; only requests with different stop strings or LM names (weights
    versions) go to separate calls. Requests that arrive while a batch is generating are served in the next ones.

    A batch holds the requests that share the oldest waiting request's prompt up to its last message (the system
    prompt and the demos of one program: the backend encodes that prefix once for the whole batch), unless that
    request is alone, in which case the oldest waiting requests go together. When many programs run at once (the p
    step's concurrent candidates), each batch is then one program's requests instead of a mix whose common prefix
    is only the system prompt's beginning.

    DSPy 3.4 asks a custom engine for one candidate per `complete()`: a call with `n=3` arrives as three requests in
    a row from the same thread, each batched with whatever the other threads are waiting on.

    A request's `response_format` is always honoured (see `bt_trl/serving/structured.py`). With `structured_outputs` the
    engine also declares it supports one, the DSPy way (`supports_response_schema`, `supported_params`): then
    JSONAdapter sends its JSON schema, and the adapters of `structured.structured_adapter` send ChatAdapter's format.
    """

    def __init__(self, backend: GenerationBackend, max_batch_size: int = 8, batch_wait: float = 0.02,
                 default_max_tokens: int = 256, structured_outputs: bool = False):
        self.backend = backend
        self.supports_response_schema = structured_outputs
        self.supported_params = {"response_format"} if structured_outputs else set()
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait
        self.default_max_tokens = default_max_tokens
        self.max_waiting = 8 * max_batch_size  # how far ahead of the oldest request a batch's requests are looked for
        self.stats = EngineStats()
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._waiting: list[_Pending] = []  # arrived, not yet generated (oldest first)
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    # Engines are borrowed resources: DSPy deep-copies programs (and their LMs); the model must not be copied.
    def __deepcopy__(self, memo):
        return self

    def complete(self, request) -> Response:
        config = request.config
        params = SamplingParams(
            max_tokens=config.max_tokens or self.default_max_tokens,
            temperature=config.temperature or 0.0,
            top_p=config.top_p,
            stop=tuple(config.stop or ()),
            grammar=output_grammar(config.response_format),
        )
        pending = _Pending(chat_messages(request), params, request.model)
        self._ensure_worker()
        self._queue.put(pending)
        return response(request, pending.future.result())

    def stream(self, request):
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            # Addressed to this worker: a request arriving meanwhile (a straggler thread DSPy's Evaluate left running)
            # starts a new worker on the same queue, which must not take this one's stop signal.
            self._queue.put(_Stop(worker))
            worker.join()

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="bt_trl-generation", daemon=True)
                self._worker.start()

    def _next_batch(self) -> list[_Pending] | None:
        waiting = self._waiting
        while not waiting:
            first = self._queue.get()
            if isinstance(first, _Stop):
                if first.worker is threading.current_thread():
                    return None
                self._queue.put(first)  # another worker's: leave it to that one
                time.sleep(self.batch_wait)
                continue
            waiting.append(first)
        while len(waiting) < self.max_waiting:
            try:
                # DSPy threads format their prompts one at a time (the GIL), so the requests of one round arrive
                # spread out: the batch closes once none has arrived for batch_wait seconds.
                item = self._queue.get(timeout=self.batch_wait)
            except queue.Empty:
                break
            if isinstance(item, _Stop):  # shutting down (this worker or another): serve what is waiting first
                self._queue.put(item)
                break
            waiting.append(item)
        prefix = _prompt_prefix(waiting[0])
        batch = [p for p in waiting if _prompt_prefix(p) == prefix][: self.max_batch_size]
        if len(batch) == 1:
            batch = waiting[: self.max_batch_size]
        chosen = {id(p) for p in batch}
        self._waiting = [p for p in waiting if id(p) not in chosen]
        return batch

    def _generate(self, model: str, prompts: list[list[dict]], params: list[SamplingParams]) -> list[Generation]:
        """One backend call for requests made under the LM name `model` (an engine serving several weights versions
        picks the version here)."""
        return self.backend.generate(prompts, params)

    def _serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            groups: dict[tuple[str, tuple[str, ...]], list[_Pending]] = defaultdict(list)
            for item in batch:
                groups[item.model, item.params.stop].append(item)
            for (model, _), group in groups.items():
                try:
                    generations = self._generate(model, [p.messages for p in group], [p.params for p in group])
                except BaseException as exc:  # delivered to the waiting DSPy threads, which count it
                    with self._lock:
                        self.stats.failed_requests += len(group)
                    for p in group:
                        p.future.set_exception(exc)
                    continue
                with self._lock:
                    self.stats.count(generations)
                for p, g in zip(group, generations):
                    p.future.set_result(g)


def _prompt_prefix(pending: _Pending) -> tuple:
    """What requests of one program share: every message but the last (system prompt, demos), and the stop strings."""
    return tuple((m["role"], m["content"]) for m in pending.messages[:-1]) + (pending.params.stop,)


def chat_messages(request) -> list[dict]:
    """A DSPy engine request (`dspy.lm15.Request`) as chat messages for a chat template."""
    messages = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system)
        messages.append({"role": "system", "content": system})
    messages.extend({"role": m.role, "content": m.text or ""} for m in request.messages)
    return messages


def response(request, generation: Generation) -> Response:
    """The DSPy engine response to `request` carrying `generation`."""
    return Response(
        id=None,
        model=request.model,
        message=Message.assistant([TextPart(generation.text)]),
        finish_reason=generation.finish_reason,
        usage=Usage(
            input_tokens=generation.prompt_tokens,
            output_tokens=generation.completion_tokens,
            total_tokens=generation.prompt_tokens + generation.completion_tokens,
        ),
    )


def engine_lm(backend: GenerationBackend, name: str, settings: GenerationSettings) -> dspy.LM:
    """A `dspy.LM` named `name` that generates with `backend` through a `BatchingEngine` of its own, whose worker
    starts with the first call and stops at `lm.engine.close()`."""
    engine = BatchingEngine(backend, max_batch_size=settings.max_batch_size, batch_wait=settings.batch_wait,
                            default_max_tokens=settings.max_tokens, structured_outputs=settings.structured)
    return dspy.LM(LM_PREFIX + name, engine=engine, max_tokens=settings.max_tokens,
                   temperature=settings.temperature, num_retries=0)


@contextmanager
def serving_lm(backend: GenerationBackend, name: str, settings: GenerationSettings):
    """`engine_lm` for the block: the engine's worker stops on exit."""
    lm = engine_lm(backend, name, settings)
    try:
        yield lm
    finally:
        lm.engine.close()


@contextmanager
def eval_mode(model):
    """Dropout off for generation; the model's previous mode is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def lm_name(model, base_fingerprint: str) -> str:
    """DSPy caches answers by LM name, so each weights version is served under its own name: the model's name, a
    fingerprint of its initial weights and one of its trainable weights."""
    base = Path(str(getattr(model.config, "_name_or_path", "") or "model")).name
    return f"{base}-{base_fingerprint}-{weights_fingerprint(model, only_trainable=True)}"


def weights_fingerprint(model, only_trainable: bool) -> str:
    """A short hash of the model's (trainable) parameters: the DSPy LM name of one weights version.

    Identical weights give the same name, so DSPy's cache is reused exactly when it is valid (a resumed run reads
    the answers of the run it continues), and new weights can never be served cached answers of old ones.
    """
    digest = hashlib.blake2b(digest_size=8)
    for name, param in model.named_parameters():
        if only_trainable and not param.requires_grad:
            continue
        digest.update(name.encode())
        digest.update(param.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
