"""Structured generation: every program call is generated inside its adapter's output format, so that a small
model's traces are lost to wrong answers, never to format.

The format travels with the request, as DSPy's own `response_format`:

* `JSONAdapter` already asks for its JSON schema when the LM declares support for one; the engine declares it
  (`BatchingEngine(structured_outputs=True)`).
* For `ChatAdapter`'s format, `structured_adapter` gives the adapter a planning step (`_call_preprocess`, the hook
  DSPy's adapters use to add LM arguments) that sends the JSON schema of the signature's output fields under the
  name `CHAT_FIELDS_FORMAT`: "these fields, in this order, in ChatAdapter's `[[ ## name ## ]]` sections". It is
  built from the signature, never from prompt text a custom adapter could change, and it is part of the request,
  so DSPy's cache never answers a constrained request with an unconstrained answer, or the reverse.

The engine compiles a `response_format` into an `OutputGrammar` (a Lark grammar for llguidance, the grammar library
vLLM and SGLang also use) and `GrammarConstraint`, a logits processor, keeps every row of a batch inside its own
grammar (rows may have different grammars, or none). ChatAdapter grammars: each output field's header on its own
line, in order; `Literal`/enum fields restricted to their values, `bool`/`int`/`float` to their lexical forms,
structured types (lists, dicts, models) to their JSON schema, `str` free text that cannot contain a field header;
then the completion marker. Free text is bounded by the row's token budget: once only the tokens the later fields
need are left, the field is closed, so a long reasoning never leaves the answer out.
"""

from __future__ import annotations

import copy
import enum
import functools
import inspect
import json
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args, get_origin

import numpy as np
import pydantic
import torch
from dspy.adapters import ChatAdapter, JSONAdapter
from dspy.adapters.types.base_type import Type as DspyType
from transformers import LogitsProcessor

logger = logging.getLogger(__name__)

# The `response_format` name that asks for the output fields in ChatAdapter's sections rather than as JSON.
CHAT_FIELDS_FORMAT = "dspy.ChatAdapter"
COMPLETION_MARKER = "[[ ## completed ## ]]"
# Free text closes with the next header; inside free text, "[[" can only start a header.
_CLOSE_FREE_TEXT = "\n\n[["
# Tokens kept in hand beyond the measured needs of the later fields (tokenization at field boundaries can differ).
_BUDGET_SLACK = 3
# The longest value an int/float field is assumed to need, for the token budget of the fields before it.
_NUMBER_PLACEHOLDER = "-1234567.125"


# ----------------------------------------------------------------------------------------------------------------
# Request side: the adapter sends the output format
# ----------------------------------------------------------------------------------------------------------------


def writes_chat_fields(adapter) -> bool:
    """Whether `adapter` writes and parses outputs in ChatAdapter's `[[ ## name ## ]]` sections (ChatAdapter and
    subclasses that keep its output format; not JSONAdapter, XMLAdapter or a custom format)."""
    cls = type(adapter)
    return isinstance(adapter, ChatAdapter) and not isinstance(adapter, JSONAdapter) and all(
        inspect.unwrap(getattr(cls, name)) is inspect.unwrap(getattr(ChatAdapter, name))
        for name in ("parse", "format_assistant_message_content", "format_field_with_value")
    )


class ChatFieldsFormat:
    """Adapter mixin: a call to an LM whose engine generates structured outputs sends the ChatAdapter output format
    of the call's signature as `response_format`."""

    def _call_preprocess(self, lm, lm_kwargs, signature, inputs):
        signature = super()._call_preprocess(lm, lm_kwargs, signature, inputs)
        if signature.output_fields and getattr(getattr(lm, "engine", None), "supports_response_schema", False):
            lm_kwargs.setdefault("response_format", chat_fields_format(signature))
        return signature


@functools.cache
def _with_chat_fields_format(cls: type) -> type:
    return type(f"Structured{cls.__name__}", (ChatFieldsFormat, cls), {"__module__": cls.__module__})


@functools.cache
def _warn_unstructured(adapter_class: str) -> None:
    logger.warning("structured generation: %s writes outputs in a format of its own; its calls are generated "
                   "unconstrained (ChatAdapter and JSONAdapter formats are constrained)", adapter_class)


def structured_adapter(adapter):
    """`adapter` asking for structured outputs: a ChatAdapter-format adapter (the user's subclass included) sends its
    output format with every call; JSONAdapter does so by itself; any other adapter is returned as it is."""
    if isinstance(adapter, (ChatFieldsFormat, JSONAdapter)):
        return adapter
    if not writes_chat_fields(adapter):
        _warn_unstructured(type(adapter).__name__)
        return adapter
    structured = copy.copy(adapter)
    structured.__class__ = _with_chat_fields_format(type(adapter))
    return structured


def chat_fields_format(signature) -> dict:
    """The `response_format` of `signature`'s outputs in ChatAdapter's format: the JSON schema of each output field,
    in the signature's order."""
    properties = {name: field_schema(field.annotation) for name, field in signature.output_fields.items()}
    schema = {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": CHAT_FIELDS_FORMAT, "schema": schema}}


def field_schema(annotation) -> dict:
    """The JSON schema of one output field's value as ChatAdapter writes it. `str` and DSPy's own types are free text
    (`{"type": "string"}`); everything else is its pydantic JSON schema."""
    if annotation is str or (isinstance(annotation, type) and issubclass(annotation, DspyType)):
        return {"type": "string"}
    if get_origin(annotation) is Literal:
        return {"enum": list(get_args(annotation))}
    if isinstance(annotation, enum.EnumMeta):
        return {"enum": [member.value for member in annotation]}
    try:
        return pydantic.TypeAdapter(annotation).json_schema()
    except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticInvalidForJsonSchema):
        return {"type": "string"}  # DSPy parses what it can; the sections themselves are still enforced


# ----------------------------------------------------------------------------------------------------------------
# Engine side: the grammar of a response_format
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputGrammar:
    """A Lark grammar (llguidance's dialect) for one output format.

    Free text is closed early when the token budget runs short (`GrammarConstraint`); the fields below say where it
    is and what must follow it. ChatAdapter formats, per output field: `free_text[i]`, whether it is free text;
    `unbounded[i]`, whether its length has no bound (free text, JSON); `after_field[i]`, the text that must still
    follow its value (later headers, the longest value of each bounded later field, the completion marker). JSON
    formats have one entry standing for every string of the object, whose `after_field` is the whole skeleton.
    """

    lark: str
    chat_fields: bool = False  # ChatAdapter sections (else JSON)
    free_text: tuple[bool, ...] = ()
    unbounded: tuple[bool, ...] = ()
    after_field: tuple[str, ...] = ()
    skeleton: str = ""  # the whole output with every unbounded field empty

    @property
    def closing(self) -> str:
        """What closes free text: the next header's opening, or a JSON string's quote."""
        return _CLOSE_FREE_TEXT if self.chat_fields else '"'



def output_grammar(response_format: dict | None) -> OutputGrammar | None:
    """The grammar a request's `response_format` asks for (None: unconstrained). Raises ValueError for a format it
    cannot honour."""
    if not response_format or response_format.get("type") == "text":
        return None
    return _compile(json.dumps(response_format))  # key order kept: it is the order of the fields


@functools.lru_cache(maxsize=256)
def _compile(response_format_json: str) -> OutputGrammar:
    response_format = json.loads(response_format_json)
    kind = response_format.get("type")
    if kind == "json_object":
        return _json_grammar({"type": "object"})
    if kind != "json_schema":
        raise ValueError(f"unsupported response_format type {kind!r} (text, json_object or json_schema)")
    # DSPy hands engines the canonical form (name and schema at the top); OpenAI's wraps them in "json_schema".
    response_format = response_format.get("json_schema", response_format)
    schema = response_format.get("schema")
    if not isinstance(schema, dict):
        raise ValueError("a json_schema response_format needs its schema")
    if response_format.get("name") == CHAT_FIELDS_FORMAT:
        return _chat_fields_grammar(schema)
    return _json_grammar(schema)


def _json_grammar(schema: dict) -> OutputGrammar:
    skeleton = json.dumps(_shortest_value(schema), ensure_ascii=False)  # llguidance writes compact JSON like this
    return OutputGrammar(f"start: {_lark_json(schema)}\n", free_text=(True,), unbounded=(True,),
                         after_field=(skeleton,), skeleton=skeleton)


def _shortest_value(schema: dict):
    """A short value of `schema`: its required properties with empty strings and lists, the longest enum value."""
    if "enum" in schema:
        return max(schema["enum"], key=lambda v: len(json.dumps(v)))
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: _shortest_value(properties.get(name, {})) for name in schema.get("required", [])}
    return {"string": "", "array": [], "boolean": False, "integer": 1234567, "number": 1234567.125}.get(kind)


def _chat_fields_grammar(schema: dict) -> OutputGrammar:
    names = list(schema["properties"])
    rules, longest = zip(*(_value_rule(f"v{i}", schema["properties"][name]) for i, name in enumerate(names)))
    free = tuple(schema["properties"][name] == {"type": "string"} for name in names)
    # Free text is a lazy lexeme that ends at the first "\n\n[[" (which opens the next header); it cannot contain
    # "[[" at all, so the model cannot write a field header of its own inside it.
    parts = []
    for i, name in enumerate(names + [None]):
        opening = COMPLETION_MARKER if name is None else f"[[ ## {name} ## ]]\n"
        if i > 0:
            opening = opening[2:] if free[i - 1] else "\n\n" + opening  # free text consumed "\n\n[["
        parts.append(_lark_string(opening) + ("" if name is None else f" v{i}"))
    lark = "start: " + " ".join(parts) + "\n" + "\n".join(rules) + "\n"
    if any(free):
        lark += r"FREE_TEXT: /(?s:.*)/ & ~/(?s:.*\[\[.*)/" + "\n"
    sections = [f"[[ ## {name} ## ]]\n" + (longest[i] or "") for i, name in enumerate(names)]
    return OutputGrammar(
        lark=lark, chat_fields=True, free_text=free, unbounded=tuple(text is None for text in longest),
        after_field=tuple("\n\n" + "\n\n".join(sections[i + 1 :] + [COMPLETION_MARKER]) for i in range(len(names))),
        skeleton="\n\n".join(sections + [COMPLETION_MARKER]),
    )


def _value_rule(rule: str, schema: dict) -> tuple[str, str | None]:
    """The Lark rule of one field's value, and the longest text it can take (None when unbounded)."""
    if schema == {"type": "string"}:
        return f'{rule}[stop={_lark_string(_CLOSE_FREE_TEXT)}]: FREE_TEXT', None
    if "enum" in schema:
        choices = [v if isinstance(v, str) else json.dumps(v) for v in schema["enum"]]
        return f"{rule}: " + " | ".join(_lark_string(c) for c in choices), max(choices, key=len)
    kind = schema.get("type")
    if kind == "boolean":
        return f'{rule}: "True" | "False" | "true" | "false"', "False"
    if kind == "integer":
        return f"{rule}: /-?[0-9]+/", _NUMBER_PLACEHOLDER
    if kind == "number":
        return f"{rule}: /-?[0-9]+(\\.[0-9]+)?([eE][-+]?[0-9]+)?/", _NUMBER_PLACEHOLDER
    return f"{rule}: {_lark_json(schema)}", None


def _lark_json(schema: dict) -> str:
    """JSON of `schema` in Lark, written compactly (json.dumps' separators, no free whitespace: a model could
    otherwise pad forever), unknown schema keywords ignored."""
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}
    return f"%json {json.dumps({**schema, 'x-guidance': options})}"


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lark string literal


# ----------------------------------------------------------------------------------------------------------------
# Engine side: constraining generation
# ----------------------------------------------------------------------------------------------------------------

_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _llg_tokenizer(tokenizer, vocab_size: int, eos_ids: Sequence[int]):
    """llguidance's view of `tokenizer` (about 0.3 s to build, so kept for the tokenizer's lifetime)."""
    import llguidance.hf

    per_vocab = _tokenizers.setdefault(tokenizer, {})
    key = (vocab_size, tuple(sorted(eos_ids)))
    if key not in per_vocab:
        per_vocab[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(key[1]))
    return per_vocab[key]


class _Row:
    """One constrained row: its matcher, its token budget and the free-text closing in progress."""

    def __init__(self, grammar: OutputGrammar, matcher, max_tokens: int, reserves: tuple[int, ...]):
        self.grammar, self.matcher, self.max_tokens, self.reserves = grammar, matcher, max_tokens, reserves
        self.generated: list[int] = []
        self.forced: list[int] = []  # tokens of a closing in progress
        self.done = False


class GrammarConstraint(LogitsProcessor):
    """Keeps each row of a `generate` batch inside its own `OutputGrammar` (rows with None are left free).

    Each call first feeds the token every constrained row just generated to its matcher, then masks every token the
    grammar does not allow next. A ChatAdapter row inside a free-text field whose remaining budget is down to what
    the later fields need is closed: the tokens of the next header's opening are forced, and the grammar forces the
    rest of the header. Put it before any sampling processor, so that greedy and sampled rows choose among allowed
    tokens only.
    """

    def __init__(self, grammars: Sequence[OutputGrammar | None], max_tokens: Sequence[int], tokenizer,
                 vocab_size: int, eos_ids: Sequence[int], prompt_width: int):
        from llguidance import LLMatcher

        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.vocab_size = vocab_size
        llg_tokenizer = _llg_tokenizer(tokenizer, vocab_size, eos_ids)
        self.rows: list[_Row | None] = []
        for grammar, limit in zip(grammars, max_tokens):
            if grammar is None:
                self.rows.append(None)
                continue
            # log_level 0: llguidance would warn each time a free-text closing spans several tokens, which is
            # expected here (the closing is part of the output, not a hidden stop string)
            matcher = LLMatcher(llg_tokenizer, LLMatcher.grammar_from_lark(grammar.lark), log_level=0)
            if matcher.is_error():
                raise ValueError(f"invalid output grammar: {matcher.get_error()}")
            self.rows.append(_Row(grammar, matcher, limit, self._reserves(grammar, limit)))

    def _reserves(self, grammar: OutputGrammar, max_tokens: int) -> tuple[int, ...]:
        """Per field: the tokens to keep for what follows it. What the skeleton leaves of `max_tokens` is the budget of
        the unbounded fields: with n of them, each one after the first keeps budget / 2n for itself."""
        if not any(grammar.free_text):
            return ()
        count = self._count_tokens
        budget = max(0, max_tokens - count(grammar.skeleton))
        share = budget // (2 * sum(grammar.unbounded))
        return tuple(count(after) + sum(grammar.unbounded[i + 1 :]) * share + _BUDGET_SLACK
                     for i, after in enumerate(grammar.after_field))

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_width
        allowed = torch.ones_like(scores, dtype=torch.bool)
        for i, row in enumerate(self.rows):
            if row is None or row.done:
                continue
            if step > 0:
                token = int(input_ids[i, -1])
                row.generated.append(token)
                if row.forced and row.forced[0] == token:
                    row.forced.pop(0)
                if not row.matcher.consume_token(token):  # a finished row being padded
                    row.done = True
                    continue
            # A complete output (the matcher stopped) leaves only the end of turn, which the mask then allows.
            mask = np.unpackbits(np.frombuffer(row.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
            row_allowed = torch.from_numpy(mask[: scores.shape[-1]].astype(bool))
            forced = self._forced_token(row, row_allowed)
            if forced is not None:
                row_allowed = torch.zeros_like(row_allowed)
                row_allowed[forced] = True
            allowed[i, : row_allowed.shape[0]] = row_allowed
        return scores.masked_fill(~allowed, float("-inf"))

    def _forced_token(self, row: _Row, allowed: torch.Tensor) -> int | None:
        """The token a closing forces next, if the row must close its free-text field now."""
        if not row.forced:
            remaining = row.max_tokens - len(row.generated)
            if not row.reserves or remaining > max(row.reserves):
                return None
            field = self._free_text_field(row)
            if field is None or remaining > row.reserves[field]:
                return None
            row.forced = self.tokenizer(row.grammar.closing, add_special_tokens=False)["input_ids"]
        token = row.forced[0]
        if token < allowed.shape[0] and allowed[token]:
            return token
        row.forced = []  # the grammar is already past this point (the field is closing by itself)
        return None

    def _free_text_field(self, row: _Row) -> int | None:
        """The index of the free-text field the row is writing, if it is writing one (past its header line)."""
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        if not row.grammar.chat_fields:  # inside a JSON string: an odd number of unescaped quotes so far
            return 0 if (text.count('"') - text.count('\\"')) % 2 else None
        field = text.count("[[") - 1  # free text cannot contain "[[": every "[[" opened a header
        if field < 0 or field >= len(row.grammar.free_text) or not row.grammar.free_text[field]:
            return None
        return field if "]]\n" in text[text.rfind("[[") :] else None
