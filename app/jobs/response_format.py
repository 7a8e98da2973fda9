"""`response_format`: the structured-output constraint of a job, as the APIs take it.

    {"type": "text"}                                          free text (the default)
    {"type": "json_object"}                                   any JSON object
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}}
    {"type": "regex", "pattern": "..."}                       text the whole regex matches
    {"type": "choice", "choices": ["yes", "no"]}              exactly one of the strings
    {"type": "grammar", "grammar": "start: ..."}              a Lark grammar (llguidance's syntax)

The first three are OpenAI's shapes (so the OpenAI SDK's `.parse()` helpers work unchanged); the last
three are genq's (and vLLM's) extensions. Checked at submission with the grammar library the engine
uses (llguidance: the same compiler, so a constraint the API accepts is one the engine can build), which
names the offending part of a schema by its path; the engine enforces it while sampling
(worker/engine/structured.py, docs/structured-outputs.md).
"""
from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

MAX_SCHEMA_BYTES = 64 * 1024       # a JSON Schema, as compact JSON
MAX_PATTERN_CHARS = 4096
MAX_CHOICES = 1000
MAX_CHOICE_CHARS = 1024
MAX_GRAMMAR_BYTES = 64 * 1024

# Where a JSON Schema nests other schemas: a keyword holding a schema, a list of schemas, or a map of them.
_SCHEMA_VALUED = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else",
                  "unevaluatedItems", "unevaluatedProperties", "additionalItems")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


class _Format(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextFormat(_Format):
    type: Literal["text"]


class JsonObjectFormat(_Format):
    type: Literal["json_object"]


class JsonSchemaSpec(_Format):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: StrictStr | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = None


class JsonSchemaFormat(_Format):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


class RegexFormat(_Format):
    type: Literal["regex"]
    pattern: Annotated[StrictStr, Field(min_length=1, max_length=MAX_PATTERN_CHARS)]


class ChoiceFormat(_Format):
    type: Literal["choice"]
    choices: Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=MAX_CHOICE_CHARS)]],
                       Field(min_length=1, max_length=MAX_CHOICES)]


class GrammarFormat(_Format):
    type: Literal["grammar"]
    grammar: Annotated[StrictStr, Field(min_length=1, max_length=MAX_GRAMMAR_BYTES)]


ResponseFormat = Annotated[Union[TextFormat, JsonObjectFormat, JsonSchemaFormat, RegexFormat, ChoiceFormat,
                                 GrammarFormat], Field(discriminator="type")]


def check(fmt: _Format) -> None:
    """Raise ValueError (naming what is wrong, and where in a schema) for a constraint the grammar
    library cannot build."""
    if isinstance(fmt, JsonSchemaFormat):
        schema = fmt.json_schema.json_schema
        size = len(json.dumps(schema, separators=(",", ":")).encode())
        if size > MAX_SCHEMA_BYTES:
            raise ValueError(f"json_schema.schema is {size} bytes of JSON; the limit is {MAX_SCHEMA_BYTES}")
        error = _schema_error(schema)
        if error is not None:
            path, message = _locate(schema, message=error)
            where = "json_schema.schema" + "".join(f"[{part!r}]" if isinstance(part, str) else f"[{part}]"
                                                   for part in path)
            raise ValueError(f"{where}: {message}")
    elif isinstance(fmt, RegexFormat):
        error = _grammar_error("regex", fmt.pattern)
        if error is not None:
            raise ValueError(f"pattern: the regular expression is not supported: {_first_lines(error)}")
    elif isinstance(fmt, ChoiceFormat):
        if len(set(fmt.choices)) != len(fmt.choices):
            raise ValueError("choices: the strings must differ from one another")
    elif isinstance(fmt, GrammarFormat):
        error = _grammar_error("lark", fmt.grammar)
        if error is not None:
            raise ValueError(f"grammar: {_first_lines(error)}")


def sampling_kwargs(fmt: _Format | None) -> dict[str, Any]:
    """The engine's `SamplingParams` fields for this constraint (none for free text)."""
    if fmt is None or isinstance(fmt, TextFormat):
        return {}
    if isinstance(fmt, JsonObjectFormat):
        return {"json": True}
    if isinstance(fmt, JsonSchemaFormat):
        return {"json": fmt.json_schema.json_schema}
    if isinstance(fmt, RegexFormat):
        return {"regex": fmt.pattern}
    if isinstance(fmt, ChoiceFormat):
        return {"choice": list(fmt.choices)}
    return {"grammar": fmt.grammar}


# -- checking with the grammar library --------------------------------------------------------------

def _grammar_error(kind: str, spec: Any) -> str | None:
    from llguidance import LLMatcher

    try:
        if kind == "json":
            grammar = LLMatcher.grammar_from_json_schema(spec)
        elif kind == "regex":
            grammar = LLMatcher.grammar_from_regex(spec)
        else:
            grammar = LLMatcher.grammar_from_lark(spec)
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    except (ValueError, TypeError, RuntimeError) as exc:
        return str(exc) or type(exc).__name__
    if failed:
        return "; ".join(messages) or "the grammar library rejected it"
    return None


def _schema_error(schema: Any) -> str | None:
    if not isinstance(schema, (dict, bool)):
        return "a JSON Schema is an object or a boolean"
    return _grammar_error("json", schema)


def _locate(schema: Any, *, message: str, path: tuple = ()) -> tuple[tuple, str]:
    """The deepest sub-schema that fails alone (references to the rest cannot resolve there, so a
    failure that only says so does not count), and its message; the root when none does."""
    for key, child in _children(schema):
        error = _schema_error(child)
        if error is not None and not re.search(r"(?i)\bpointer\b|\$ref|reference", error):
            return _locate(child, message=error, path=path + key)
    return path, _first_lines(message)


def _children(schema: Any):
    if not isinstance(schema, dict):
        return
    for name in _SCHEMA_VALUED:
        if isinstance(schema.get(name), (dict, bool)):
            yield (name,), schema[name]
    for name in _SCHEMA_LISTS:
        if isinstance(schema.get(name), list):
            for i, child in enumerate(schema[name]):
                yield (name, i), child
    for name in _SCHEMA_MAPS:
        if isinstance(schema.get(name), dict):
            for key, child in schema[name].items():
                yield (name, key), child


def _first_lines(message: str, limit: int = 300) -> str:
    text = " ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit - 1] + "…"
