"""PEFT's module-name patterns (a target_modules regex, rank_pattern / alpha_pattern keys),
resolved over the base model's module names so that no pattern can hang the process.

Python's `re` backtracks: `(a+)+$` or `(x+x+)+y` take exponential time, `.*.*.*.*x` polynomial
time with a large exponent, and the GIL is held throughout, so a thread cannot be given a
timeout. The rule here:
- a pattern is only ever matched against the model's finite set of module names
  (model.layers.{i}.{self_attn|mlp}.{q_proj..down_proj}, or Phi-3's qkv_proj and gate_up_proj),
  and is at most MAX_PATTERN_CHARS long;
  an adapter holds at most MAX_PATTERN_KEYS rank_pattern + alpha_pattern keys;
- a pattern without repeats, lookarounds or backreferences has a static bound on its
  backtracking (the product of its alternations' branch counts, times its length, per start
  position); while that bound over all of an adapter's patterns and names stays under
  INPROC_STEPS, they are matched in this process;
- anything else is matched in a short-lived worker process that gets MATCH_TIMEOUT_S of matching
  time (its interpreter's start-up not counted); a pattern still running then is refused.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

try:
    from re import _constants as _sre  # Python >= 3.11
    from re import _parser as _sre_parse
except ImportError:  # Python 3.10
    import sre_constants as _sre
    import sre_parse as _sre_parse

MAX_PATTERN_CHARS = 512  # one target_modules regex or one rank_pattern / alpha_pattern key
MAX_PATTERN_KEYS = 1024  # rank_pattern and alpha_pattern keys together
MATCH_TIMEOUT_S = 1.0  # matching time the worker gets for one adapter's patterns
INPROC_STEPS = 5_000_000  # bound on regex steps matched in this process (tens of ms at worst)
# module_rules keeps answers for pattern sets up to this size as JSON: 64 of them, a few MB at most
_MEMO_KEY_CHARS = 64 * 1024
_WORKER_START_S = 10.0  # on top of MATCH_TIMEOUT_S: a busy machine starts an interpreter slowly

# Runs with `python -I -S`: standard library only, no user site or PYTHONPATH. SIGALRM interrupts
# sre's matching loop (it checks for signals), so the budget holds even inside one match.
_WORKER = r"""
import json, re, signal, sys
def stop(*_):
    raise TimeoutError
job = json.load(sys.stdin)
signal.signal(signal.SIGALRM, stop)
signal.setitimer(signal.ITIMER_REAL, job["budget_s"])
out, i = [], 0
try:
    for i, (regex, full) in enumerate(job["jobs"]):
        rx = re.compile(regex)
        test = rx.fullmatch if full else rx.match
        out.append([k for k, n in enumerate(job["names"]) if test(n)])
    result = {"matches": out}
except TimeoutError:
    result = {"timeout": i}
signal.setitimer(signal.ITIMER_REAL, 0)
json.dump(result, sys.stdout)
"""


class PatternError(ValueError):
    """A pattern is refused; the message names the config field and the pattern."""


class _Timeout(Exception):
    """args[0]: the index of the job still running when time ran out (None: the worker itself)."""


@dataclass(frozen=True)
class ModuleRules:
    """One config's targeting rules, resolved over the model's module names."""

    targets: frozenset[str] | None  # module names that get LoRA; None: every module
    rank: Mapping[str, int]  # module name -> rank_pattern value, for the names some key matches
    alpha: Mapping[str, float]  # module name -> alpha_pattern value, likewise


# the module each LoRA-targetable projection sits in, as checkpoints and adapters name them
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
          "qkv_proj": "self_attn", "gate_up_proj": "mlp",  # (fused in Phi-3's and GLM's checkpoints)
          "c_fc": "mlp", "c_proj": "mlp",  # (StarCoder2's MLP without a gate: up and down)
          "dense": "self_attn", "fc1": "mlp", "fc2": "mlp"}  # (Phi's o, up and down)
SPLIT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@functools.lru_cache(maxsize=16)
def module_names(num_layers: int, modules: tuple[str, ...] = SPLIT_MODULES,
                 layers: str = "model.layers") -> tuple[str, ...]:
    """Every adapter-targetable module's full name in a model of `num_layers` whose checkpoint
    names the projections `modules` (ModelArgs.adapter_modules), its layers `layers`
    (ModelArgs.layer_prefix)."""
    return tuple(f"{layers}.{i}.{PARENT[m]}.{m}" for i in range(num_layers) for m in modules)


def key_regex(key: str) -> str:
    """PEFT's rule for rank_pattern / alpha_pattern: the key matches the end of the module's name."""
    return rf"(.*\.)?({key})$"


def check_regex(what: str, pattern: str, regex: str) -> None:
    """Refuses a pattern that is too long or does not compile (as the regex PEFT builds from it)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"{what} is {len(pattern)} characters, more than {MAX_PATTERN_CHARS}")
    try:
        re.compile(regex)
    except re.error as e:
        raise PatternError(f"{what} {pattern!r} is not a valid regex ({e})") from e


def module_rules(cfg: dict, names: tuple[str, ...]) -> ModuleRules:
    """PEFT's rules: a target_modules string must fullmatch a name, a list entry equal it or end it
    after a "." (exclude_modules alike takes names out); the first rank_pattern / alpha_pattern
    key matching a name's end gives its value.
    The config is already validated (types, check_regex on every pattern).

    Resolved once per distinct (patterns, names): a start-up folder of thousands of adapters
    usually holds a handful of distinct configs, and resolving costs a pass of every pattern over
    every module name. The key is the patterns as JSON (order kept: the first matching key wins)
    and INPROC_STEPS, which decides where matching runs."""
    fields = json.dumps([cfg.get("target_modules"), cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {},
                         cfg.get("exclude_modules")])
    if len(fields) > _MEMO_KEY_CHARS:  # a rare huge pattern set is resolved each time, not kept
        return _resolve.__wrapped__(fields, names, INPROC_STEPS)
    return _resolve(fields, names, INPROC_STEPS)


# The answers are shared between adapters: their rank / alpha maps are read-only views. Refusals
# raise, so they are not memoized (a timeout on a busy machine is tried again next time).
@functools.lru_cache(maxsize=64)
def _resolve(fields: str, names: tuple[str, ...], _inproc_steps: int) -> ModuleRules:
    targets, rank_pattern, alpha_pattern, exclude = json.loads(fields)
    jobs = [("target_modules regex", targets, targets, True)] if isinstance(targets, str) else []
    jobs += [("exclude_modules regex", exclude, exclude, True)] if isinstance(exclude, str) else []
    jobs += [("rank_pattern key", k, key_regex(k), False) for k in rank_pattern]
    jobs += [("alpha_pattern key", k, key_regex(k), False) for k in alpha_pattern]
    found = iter(_match(jobs, names))

    def named(entries: list[str]) -> frozenset[str]:
        return frozenset(n for n in names if any(n == t or n.endswith("." + t) for t in entries))

    chosen = next(found) if isinstance(targets, str) else named(targets) if targets is not None else None
    if exclude:
        excluded = next(found) if isinstance(exclude, str) else named(exclude)
        chosen = (chosen if chosen is not None else frozenset(names)) - excluded
    firsts = []
    for pattern in (rank_pattern, alpha_pattern):
        first: dict = {}
        for value in pattern.values():
            for n in next(found):
                first.setdefault(n, value)
        firsts.append(MappingProxyType(first))
    return ModuleRules(chosen, *firsts)


def _match(jobs: list[tuple[str, str, str, bool]], names: tuple[str, ...]) -> list[frozenset[str]]:
    """For each (what, pattern, regex, fullmatch) job, the names its regex matches."""
    matched: list = [None] * len(jobs)
    spent, far = 0, []
    for i, (_, pattern, regex, full) in enumerate(jobs):
        steps = _steps_bound(pattern, full, names)
        if steps is not None and spent + steps <= INPROC_STEPS:
            spent += steps
            rx = re.compile(regex)
            test = rx.fullmatch if full else rx.match
            matched[i] = frozenset(n for n in names if test(n))
        else:
            far.append(i)
    if far:
        try:
            found = _match_in_worker(tuple((jobs[i][2], jobs[i][3]) for i in far), names)
        except _Timeout as e:
            what, pattern = ("patterns", "") if e.args[0] is None else jobs[far[e.args[0]]][:2]
            raise PatternError(
                f"{what} {pattern!r} takes more than {MATCH_TIMEOUT_S:g}s to match the model's {len(names)} "
                f"module names (nested or overlapping repeats?); refused, simplify the pattern"
            ) from None
        for i, m in zip(far, found):
            matched[i] = m
    return matched


def _paths(parsed) -> int | None:
    """Backtracking paths through a parsed regex without repeats; None for constructs not bounded here."""
    total = 1
    for op, av in parsed:
        if op in (_sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY, _sre.IN, _sre.AT):
            continue
        if op is _sre.SUBPATTERN:
            n = _paths(av[-1])
        elif op is _sre.BRANCH:
            counts = [_paths(alt) for alt in av[1]]
            n = None if None in counts else sum(counts)
        else:  # repeats, lookarounds, backreferences, conditionals
            return None
        if n is None:
            return None
        total *= n
        if total > INPROC_STEPS:
            return None
    return total


def _steps_bound(pattern: str, full: bool, names: tuple[str, ...]) -> int | None:
    """A bound on sre's steps matching the job of `pattern` over `names`; None: not bounded."""
    try:
        paths = _paths(_sre_parse.parse(pattern))
    except Exception:  # private API: should it change, every pattern goes to the worker
        return None
    if paths is None:
        return None
    longest = max(map(len, names))
    # a key's `(.*\.)?` prefix scans the name once and tries the key after each "." and at 0
    starts = 1 if full else max(n.count(".") for n in names) + 1
    return len(names) * (longest + starts * paths * (len(pattern) + 1))


# A memo of a pure function: re-reading an adapter that the host budget dropped does not start
# a worker again. Timeouts raise, so they are not memoized (a busy machine may time out once).
@functools.lru_cache(maxsize=256)
def _match_in_worker(jobs: tuple[tuple[str, bool], ...], names: tuple[str, ...]) -> tuple[frozenset[str], ...]:
    job = json.dumps({"jobs": jobs, "names": names, "budget_s": MATCH_TIMEOUT_S})
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", _WORKER], input=job, capture_output=True,
                              text=True, timeout=MATCH_TIMEOUT_S + _WORKER_START_S)
    except subprocess.TimeoutExpired:  # run() has killed it
        raise _Timeout(None) from None
    except OSError as e:
        raise PatternError(f"patterns cannot be checked: the matching worker did not start ({e})") from e
    try:
        out = json.loads(done.stdout)
    except ValueError:
        raise PatternError(f"patterns cannot be checked: the matching worker failed ({done.stderr[-300:]!r})") from None
    if "timeout" in out:
        raise _Timeout(out["timeout"])
    return tuple(frozenset(names[k] for k in m) for m in out["matches"])
