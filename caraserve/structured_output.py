"""Structured outputs (vLLM's guided decoding): a request may ask that its output match a JSON
schema, any JSON object, a regular expression, one of a list of strings, or an EBNF grammar.

A request that asks carries a grammar matcher (xgrammar's, the default backend of vLLM and
SGLang). Before each of its tokens is sampled the matcher gives the tokens that may come next, as
a bitmask over the vocabulary, and every other token's logit becomes -inf (`mask_logits`); the
sampled token then advances the matcher (`Grammar.accept`). Once the grammar is complete the
only tokens it allows are the model's EOS tokens, which end the request as EOS does.

The constraint is compiled once per distinct spec and tokenizer (xgrammar's compiler caches
them); the compile is also what checks the spec, so a bad schema, regex or grammar is the
caller's error (RequestError) before the request is queued.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, fields

import torch

from caraserve.request import RequestError

MAX_SPEC_CHARS = 1 << 20  # a schema, regex or grammar's text: compile time and memory grow with it
KINDS = ("json", "json_object", "regex", "choice", "grammar")
COMPILED_CACHE_BYTES = 256 << 20  # compiled grammars kept for reuse (least recently used go first)


@dataclass(frozen=True)
class StructuredOutputs:
    """What a request's output must match (vLLM's StructuredOutputsParams): exactly one of
    json (a JSON schema: JSON text, or a mapping, kept as its JSON text), json_object (any JSON
    object), regex, choice (one of these strings, exactly) and grammar (EBNF, in xgrammar's
    dialect of GBNF: `root ::= ...`). JSON may have whitespace between its tokens, as vLLM's
    default allows, unless disable_any_whitespace (then none)."""

    json: str | dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self):
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise RequestError(f"structured outputs: give exactly one of {', '.join(KINDS)}"
                               + (f" (got {', '.join(given)})" if given else ""))
        if isinstance(self.json, dict):
            object.__setattr__(self, "json", json.dumps(self.json, sort_keys=True))
        if self.json is not None:
            if not isinstance(self.json, str):
                raise RequestError(f"structured outputs: json must be a JSON schema (an object or its JSON "
                                   f"text), got {type(self.json).__name__}")
            try:
                if not isinstance(json.loads(self.json), dict | bool):
                    raise RequestError("structured outputs: json must be a JSON schema: an object (or true)")
            except json.JSONDecodeError as e:
                raise RequestError(f"structured outputs: json is not JSON text ({e})") from None
        for name in ("json_object", "disable_any_whitespace"):
            if not isinstance(getattr(self, name), bool):
                raise RequestError(f"structured outputs: {name} must be true or false, got {getattr(self, name)!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise RequestError(f"structured outputs: {name} must be a non-empty string, got {value!r:.80}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, list | tuple) or not self.choice or \
                    not all(isinstance(c, str) and c for c in self.choice):
                raise RequestError(f"structured outputs: choice must be a non-empty list of non-empty strings, "
                                   f"got {self.choice!r:.80}")
            object.__setattr__(self, "choice", tuple(self.choice))
        size = len(self.json or self.regex or self.grammar or "") + sum(map(len, self.choice or ()))
        if size > MAX_SPEC_CHARS:
            raise RequestError(f"structured outputs: the {given[0]} is {size} characters, more than the "
                               f"{MAX_SPEC_CHARS} taken")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @classmethod
    def of(cls, value) -> StructuredOutputs:
        """From a StructuredOutputs or its fields as a mapping (an offline line's JSON)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise RequestError(f"structured_outputs must be an object with one of {', '.join(KINDS)}, "
                               f"got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise RequestError(f"structured_outputs: field(s) {unknown} are not served here (fields: "
                               f"{', '.join(sorted(known))})")
        return cls(**{k: v for k, v in value.items() if v is not None})


class Grammar:
    """One request's matcher: the tokens its output may go on with, and its progress."""

    def __init__(self, compiled):
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the tokens allowed next into row `row` of an xgrammar token bitmask."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advances past a sampled token; False (and no change) for a token the grammar refuses."""
        return self._matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its end (an EOS token) was accepted."""
        return self._matcher.is_terminated()


class Grammars:
    """Compiles StructuredOutputs against the model's tokenizer, whose vocabulary xgrammar reads
    once, at the first request that needs it (a large vocabulary takes a moment)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids):
        self._tokenizer, self._vocab_size, self._eos = tokenizer, vocab_size, sorted(eos_ids)
        self._compiler = None
        self._lock = threading.Lock()  # the compiler is made once

    def matcher(self, spec: StructuredOutputs) -> Grammar:
        """A fresh matcher of the spec's grammar; RequestError when the spec does not compile."""
        return Grammar(self.compile(spec))

    def compile(self, spec: StructuredOutputs):
        """The spec's compiled grammar (cached by the compiler); RequestError naming what is wrong."""
        if self._tokenizer is None:
            raise RequestError("structured outputs need the model's tokenizer, and this model has none")
        compiler = self._compiler or self._make_compiler()
        try:  # (the compiler is thread-safe: the server compiles off its event loop, the engine finds it cached)
            if spec.json is not None or spec.json_object:  # (OpenAI's JSON mode: an object)
                return compiler.compile_json_schema(spec.json or '{"type": "object"}',
                                                    any_whitespace=not spec.disable_any_whitespace)
            if spec.regex is not None:
                return compiler.compile_regex(spec.regex)
            if spec.choice is not None:
                return compiler.compile_grammar(choice_grammar(spec.choice))
            return compiler.compile_grammar(spec.grammar)
        except Exception as e:  # xgrammar raises RuntimeError / ValueError with the parser's message
            raise RequestError(f"structured outputs: the {spec.kind} does not compile: "
                               f"{str(e).strip() or type(e).__name__}") from None

    def _make_compiler(self):
        try:
            import xgrammar as xgr
        except ImportError as e:  # a declared dependency, missing from this environment
            raise RequestError(f"structured outputs need the xgrammar package, which does not import here ({e})") \
                from None
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                          stop_token_ids=self._eos or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=COMPILED_CACHE_BYTES)
        return self._compiler


def choice_grammar(choices: tuple[str, ...]) -> str:
    """An EBNF grammar whose only sentences are the choices, each a string literal (JSON's
    escapes, which xgrammar's EBNF reads)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class GrammarConflict(ValueError):
    """A row's grammar allows only tokens its other settings rule out (allowed_token_ids,
    min_tokens' ban on EOS, logit_bias of -inf): no token can be sampled."""


def mask_logits(logits: torch.Tensor, grammars: list[Grammar | None]) -> torch.Tensor:
    """Semantics, in place, for each row i of logits [B, V] whose grammars[i] is not None:
        logits[i, t] = -inf     for every token t the grammar does not allow next
    GrammarConflict when that leaves a row with no token to sample (every logit -inf)."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return logits
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(grammars), logits.shape[-1])
    for i in rows:
        grammars[i].fill(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
    idx = torch.tensor(rows, device=logits.device)
    empty = torch.isneginf(logits.index_select(0, idx)).all(-1).tolist()
    if any(empty):
        raise GrammarConflict(f"rows {[i for i, e in zip(rows, empty) if e]}: the structured output's grammar "
                              "allows no token the request's other settings allow (allowed_token_ids, "
                              "logit_bias, min_tokens)")
    return logits
