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

import numpy as np
import torch

from caraserve.request import RequestError

MAX_SPEC_CHARS = 1 << 20  # a schema, regex or grammar's text: compile time and memory grow with it
KINDS = ("json", "json_object", "regex", "choice", "grammar")
COMPILED_CACHE_BYTES = 256 << 20  # compiled grammars kept for reuse (least recently used go first)
CHOICE_DEPTH = 64  # branchings on one path of a choice list's prefix tree (nested parentheses in its grammar)
CONFLICT = ("the structured output's grammar allows no token the request's other settings allow "
            "(allowed_token_ids, logit_bias)")


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
            object.__setattr__(self, "json", json.dumps(self.json))  # (in its order: the output's keys follow it)
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
    def completed(self) -> bool:
        """The output so far is a whole sentence of the grammar (its end may come next)."""
        return self._matcher.is_completed()

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self._matcher.stop_token_ids)

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
    """An EBNF grammar whose only sentences are the choices, string literals (JSON's escapes,
    which xgrammar's EBNF reads) over their prefix tree: a flat alternation of n choices compiles
    in time that grows faster than n (10k choices: seconds), the tree in about linear time. Past
    CHOICE_DEPTH branchings on one path (nested parentheses that deep), the flat form."""
    root: dict = {}
    for c in choices:
        node = root
        for ch in c:
            node = node.setdefault(ch, {})
        node[None] = {}  # a choice ends here

    def expr(node: dict, depth: int) -> str:
        if depth > CHOICE_DEPTH:
            raise RecursionError
        alts = []
        for ch, child in node.items():
            if ch is None:
                continue
            text = ch
            while len(child) == 1 and None not in child:  # a run with no branching: one literal
                ((ch2, child),) = child.items()
                text += ch2
            rest = "" if set(child) == {None} else " " + expr(child, depth + 1)
            alts.append(json.dumps(text, ensure_ascii=False) + rest)
        if None in node:
            alts.append('""')
        return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"

    try:
        return "root ::= " + expr(root, 0)
    except RecursionError:
        return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class GrammarConflict(ValueError):
    """Rows whose grammar allows only tokens their other settings rule out (allowed_token_ids,
    a logit_bias of -100): no token can be sampled. The caller's settings: a 400."""

    def __init__(self, rows: list[int]):
        super().__init__(CONFLICT)
        self.rows = rows


def mask_logits(logits: torch.Tensor, grammars: list[Grammar | None], unadjusted: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Semantics, in place, for each row i of logits [B, V] whose grammars[i] is not None:
        logits[i, t] = -inf     for every token t the grammar does not allow next
    and where that leaves row i nothing to sample while its grammar is complete (its end is all
    it allows, and min_tokens' ban on EOS took that), logits[i, s] = unadjusted[i, s] for its
    stop tokens s: a complete output ends, as it does with ignore_eos. A row still left with
    nothing is found when sampling finds no token (`conflicts`)."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return logits
    import xgrammar as xgr

    vocab = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(len(grammars), vocab)  # [B, ceil(V / 32)] int32: bit t % 32 of word t // 32
    for i in rows:
        grammars[i].fill(bitmask, i)
    if logits.device.type == "cpu":
        # the words' bits in token order (little-endian words, bits low to high) as one boolean
        # mask: several times faster than xgrammar's CPU form, which also takes contiguous rows only
        blocked = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, count=vocab, bitorder="little") == 0
        blocked[[i for i, g in enumerate(grammars) if g is None]] = False
        if logits.dtype == torch.float32 and logits.is_contiguous():
            np.copyto(logits.numpy(), -np.inf, where=blocked)
        else:
            logits.masked_fill_(torch.from_numpy(blocked), float("-inf"))
    else:  # xgrammar's kernel reads the bitmask itself, over contiguous rows
        rows_of = logits if logits.is_contiguous() else logits.contiguous()
        xgr.apply_token_bitmask_inplace(rows_of, bitmask.to(logits.device, non_blocking=True), indices=rows)
        if rows_of is not logits:
            logits.copy_(rows_of)
    for i in rows:  # (a complete grammar is the rare case: only its rows are looked at)
        if unadjusted is not None and grammars[i].completed and bool(torch.isneginf(logits[i]).all()):
            stops = torch.tensor(grammars[i].stop_token_ids, device=logits.device)
            logits[i, stops] = unadjusted[i, stops]
    return logits


def conflicts(logits: torch.Tensor, grammars: list[Grammar | None] | None, rows: list[int]) -> list[int]:
    """Of rows that had no token to sample, those whose grammar left them nothing (every logit
    -inf, not NaN): the sampler's GrammarConflict, told apart only when sampling finds no token."""
    return [i for i in rows if grammars is not None and grammars[i] is not None
            and bool(torch.isneginf(logits[i].float()).all())]
