"""Batch latency model: how long a decode step and a prefill take for a batch of a given shape.

The paper (mechanism D) finds decode-step latency close to linear in batch_size x max_rank for a
padded kernel (Punica BGMV) or in the sum of ranks for an unpadded one (S-LoRA MBGMV), R^2 = 0.96.
This module fits a small linear model per phase by least squares, picking among a few candidate
feature sets by held-out error, and keeps exponentially weighted sufficient statistics so that
`observe` refits it online as the hardware (or the kernel) drifts from the offline profile.

Out-of-grid queries: with `clamp=True` each feature is clamped to the range the model was fitted
(and has since observed) on; with `clamp=False` (the default) the linear law is extrapolated.
Extrapolation is the default because the law is physical (more requests or higher ranks cost
more work): clamping would make a batch of 64 look as cheap as the largest profiled batch of 32
and lead a router to overpack.

Mixed steps (decode rows plus prefill chunks in one step) are decode steps with prompt tokens:
their features add the step's prefill tokens and sum(chunk_tokens x rank). A decode fit profiled
with mixed steps has terms for them; one that was not adds the prefill law's per-token cost (its
prediction less its fixed part) and learns nothing from the mixed steps it observes (what it
would learn is the prefill law's error, which no online refit corrects).

All times are seconds. Nothing here imports torch: the model is shared by the engine's scheduler
and the cluster policies and must load in a router process.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

from caraserve.config_checks import ConfigError
from caraserve.perf.linear_fit import FitReport, LinearFit, Vector, design, nonneg_solve, select_fit, weighted_stats

log = logging.getLogger(__name__)

# Padded kernel, unpadded kernel, or both (a kernel that pads within rank buckets); each alone or
# with the prompt tokens a mixed step carries (and their LoRA work).
DECODE_CANDIDATES = tuple(
    law + mixed
    for law in (("1", "bs", "bs*max_rank"), ("1", "bs", "sum_ranks"), ("1", "bs", "bs*max_rank", "sum_ranks"))
    for mixed in ((), ("tokens",), ("tokens", "token_rank")))
PREFILL_CANDIDATES = (("1", "tokens"), ("1", "tokens", "tokens*max_rank"), ("1", "tokens", "token_rank"),
                      ("1", "tokens", "tokens*max_rank", "token_rank"))

HEADER_KEYS = ("device", "model", "dtype", "torch", "created")

MEMO_ENTRIES = 1 << 18


@dataclass(frozen=True)
class DecodeFeatures:
    """One decode step: every running request contributes one token. A mixed step also carries
    `prefill_tokens` prompt tokens; prefill_token_rank = sum over its chunks of tokens * rank."""

    batch_size: int
    max_rank: int
    sum_ranks: int
    prefill_tokens: int = 0
    prefill_token_rank: int = 0

    @classmethod
    def of(cls, ranks: Sequence[int], chunks: Sequence[int] = (), chunk_ranks: Sequence[int] = ()) -> DecodeFeatures:
        """ranks: the decode rows' adapter ranks (0: base model); chunks, chunk_ranks: the prompt
        tokens of each prefill chunk in the step and its adapter's rank."""
        return cls(len(ranks), max((*ranks, *chunk_ranks), default=0), sum(ranks), sum(chunks),
                   sum(t * r for t, r in zip(chunks, chunk_ranks, strict=True)))

    def vector(self) -> Vector:
        return (self.batch_size, self.max_rank, self.sum_ranks, self.prefill_tokens, self.prefill_token_rank)


@dataclass(frozen=True)
class PrefillFeatures:
    """One prefill of `batch_size` new requests; token_rank = sum over requests of prompt_tokens * rank."""

    batch_size: int
    tokens: int
    max_rank: int
    token_rank: int

    @classmethod
    def of(cls, prompt_tokens: Sequence[int], ranks: Sequence[int]) -> PrefillFeatures:
        return cls(len(ranks), sum(prompt_tokens), max(ranks, default=0),
                   sum(t * r for t, r in zip(prompt_tokens, ranks, strict=True)))

    def vector(self) -> Vector:
        return (self.batch_size, self.max_rank, 0, self.tokens, self.token_rank)


def bucket_rank(v: Vector, buckets: tuple[int, ...]) -> Vector:
    """v with its max rank rounded up to the smallest bucket >= it (unchanged beyond the largest)."""
    for b in buckets:
        if v[1] <= b:
            return (v[0], b, v[2], v[3], v[4])
    return v


def make_header(device: str, model: str, dtype: str, **extra) -> dict:
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "none"
    return {"device": device, "model": model, "dtype": dtype, "torch": torch_version,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra}


class PerfModel:
    """Predicts decode-step and prefill seconds of a batch; refits online from observations.

    rank_buckets: when set, a batch's max rank is rounded up to the smallest bucket >= it (the
    compiled step it would run), in fitting and prediction alike. Predictions are floored at 0.
    forgetting: weight kept by past evidence per online observation (memory ~ 1 / (1 - forgetting)).
    """

    def __init__(self, decode: LinearFit, prefill: LinearFit, header: dict, *, clamp: bool = False,
                 forgetting: float = 0.99, rank_buckets: Sequence[int] = ()):
        missing = [k for k in HEADER_KEYS if k not in header]
        if missing:
            raise ValueError(f"perf model header lacks {missing}; needs {list(HEADER_KEYS)}")
        if not 0 < forgetting <= 1:
            raise ValueError(f"forgetting={forgetting} must be in (0, 1]")
        if list(rank_buckets) != sorted(set(rank_buckets)):
            raise ValueError(f"rank_buckets={list(rank_buckets)} must be strictly increasing")
        self.decode = decode
        self.prefill = prefill
        self.header = dict(header)
        self.clamp = clamp
        self.forgetting = forgetting
        self.rank_buckets = tuple(int(b) for b in rank_buckets)
        # Routers ask the same few batch shapes over and over; observe() clears it.
        self._memo: dict[tuple, float] = {}

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def fit(cls, decode_samples: Sequence[tuple[DecodeFeatures, float]],
            prefill_samples: Sequence[tuple[PrefillFeatures, float]], header: dict, *, seed: int = 0,
            test_fraction: float = 0.25, clamp: bool = False, forgetting: float = 0.99,
            rank_buckets: Sequence[int] = ()) -> PerfModel:
        """Least squares per phase over the candidate feature sets, chosen by held-out error on a
        split seeded by `seed`."""
        rng = np.random.default_rng(seed)
        fits = []
        # Samples with mixed steps are fitted by laws with prompt-token terms only (a law without
        # them would fold the prompts' cost into its other terms, and prediction adds it again);
        # samples without them by laws without (nothing to fit the terms by).
        mixed = any(f.prefill_tokens for f, _ in decode_samples)
        decode_candidates = tuple(c for c in DECODE_CANDIDATES if ("tokens" in c) == mixed)
        for samples, candidates in ((decode_samples, decode_candidates), (prefill_samples, PREFILL_CANDIDATES)):
            vectors = [bucket_rank(f.vector(), tuple(rank_buckets)) for f, _ in samples]
            fits.append(select_fit(vectors, [s for _, s in samples], candidates, rng, test_fraction))
        model = cls(fits[0], fits[1], header, clamp=clamp, forgetting=forgetting, rank_buckets=rank_buckets)
        log.info("perf model fitted: %s", model.describe())
        return model

    @classmethod
    def linear(cls, *, decode_base_ms: float = 19.0, decode_per_request_ms: float = 0.1,
               decode_per_rank_request_ms: float = 0.0038, prefill_base_ms: float = 19.0,
               prefill_per_token_ms: float = 0.1, prefill_per_token_rank_ms: float = 0.00008,
               clamp: bool = False, forgetting: float = 0.99) -> PerfModel:
        """The paper-like model of Llama-2-7B (fp16) on one A100 with a padded (BGMV) kernel:

            decode_ms  = 19 + 0.1 * bs + 0.0038 * bs * max_rank
            prefill_ms = 19 + 0.1 * tokens + 0.00008 * sum(tokens_i * rank_i)

        Calibration: ~19 ms is the weight-read floor of a 7B fp16 step plus launch overheads, so a
        batch of one decodes in ~19.3 ms (paper: ~20 ms); bs 32 at rank 64 gives 19 + 3.2 + 7.8 =
        30.0 ms (paper: ~30 ms); bs 32 at rank 8 gives 23.2 ms, so rank mix alone moves a full
        batch by 29 % (paper: ~28 %). Prefill is compute bound, ~0.1 ms per token (14 GFLOP per
        token at ~140 TFLOP/s effective), plus the same fixed floor and a LoRA term worth ~5 % at
        rank 64; a 256-token prefill is then ~46 ms, ~1.5 decode steps (the artifact's rule).
        The sufficient statistics are those of a noise-free grid (bs 1-32 x rank 8-64, prompts
        16-2048 tokens), which is also the range `clamp` trusts.
        """
        decode_terms, prefill_terms = ("1", "bs", "bs*max_rank"), ("1", "tokens", "token_rank")
        decode_coef = np.array([decode_base_ms, decode_per_request_ms, decode_per_rank_request_ms]) / 1e3
        prefill_coef = np.array([prefill_base_ms, prefill_per_token_ms, prefill_per_token_rank_ms]) / 1e3
        ranks = (8, 16, 32, 64)
        dec = [DecodeFeatures(b, r, b * r).vector() for b in (1, 2, 4, 8, 16, 32) for r in ranks]
        pre = [PrefillFeatures(1, t, r, t * r).vector() for t in (16, 64, 256, 1024, 2048) for r in ranks]
        fits = []
        for terms, coef, grid in ((decode_terms, decode_coef, dec), (prefill_terms, prefill_coef, pre)):
            x = design(terms, grid)
            arr = np.array(grid, dtype=np.float64)
            report = FitReport(terms, 1.0, 0.0, len(grid))
            fits.append(LinearFit(terms, coef, arr.min(axis=0), arr.max(axis=0), *weighted_stats(x, x @ coef), report))
        header = make_header("A100-80GB (paper-calibrated, not measured)", "Llama-2-7B", "float16",
                             source="linear(paper-like)")
        return cls(fits[0], fits[1], header, clamp=clamp, forgetting=forgetting)

    # ---- prediction ---------------------------------------------------------------------------

    def _raw(self, fit: LinearFit, v: Vector) -> float:
        v = bucket_rank(v, self.rank_buckets)
        return fit.predict(fit.clamp(v) if self.clamp else v)

    def _predict(self, fit: LinearFit, v: Vector) -> float:
        return max(self._raw(fit, v), 0.0)

    def decode_s(self, batch_size: int, max_rank: int, sum_ranks: int, prefill_tokens: int = 0,
                 prefill_token_rank: int = 0) -> float:
        """Seconds of one decode step over `batch_size` running requests (0 for an empty batch);
        with prefill_tokens > 0, of a mixed step that also computes that many prompt tokens."""
        if batch_size <= 0:
            return 0.0
        key = (0, batch_size, max_rank, sum_ranks, prefill_tokens, prefill_token_rank)
        y = self._memo.get(key)
        if y is None:
            v = (batch_size, max_rank, sum_ranks, prefill_tokens, prefill_token_rank)
            y = self._predict(self.decode, v) + self._unmodelled_prefill_s(v)
            y = self._memoize(key, y)
        return y

    def _unmodelled_prefill_s(self, v: Vector) -> float:
        """The prompt tokens of a mixed step that the decode law has no terms for, priced by the
        prefill law without its fixed part (which the decode step already pays)."""
        if v[3] <= 0 or self.decode.uses("tokens"):
            return 0.0
        # both unfloored: a law whose fixed part is negative must not add it back
        chunk = (1, v[1], 0, v[3], v[4])
        return max(self._raw(self.prefill, chunk) - self._raw(self.prefill, (1, v[1], 0, 0, 0)), 0.0)

    def prefill_s(self, batch_size: int, tokens: int, max_rank: int, token_rank: int) -> float:
        """Seconds of one prefill of `batch_size` new requests holding `tokens` prompt tokens."""
        if batch_size <= 0:
            return 0.0
        key = (1, batch_size, tokens, max_rank, token_rank)
        y = self._memo.get(key)
        if y is None:
            y = self._memoize(key, self._predict(self.prefill, (batch_size, max_rank, 0, tokens, token_rank)))
        return y

    def _memoize(self, key: tuple, y: float) -> float:
        if len(self._memo) >= MEMO_ENTRIES:
            self._memo.clear()
        self._memo[key] = y
        return y

    def predict(self, features: DecodeFeatures | PrefillFeatures) -> float:
        if isinstance(features, DecodeFeatures):
            return self.decode_s(*features.vector())
        return self.prefill_s(features.batch_size, features.tokens, features.max_rank, features.token_rank)

    def in_range(self, features: DecodeFeatures | PrefillFeatures) -> bool:
        fit = self.decode if isinstance(features, DecodeFeatures) else self.prefill
        return fit.in_range(bucket_rank(features.vector(), self.rank_buckets))

    # ---- online refit -------------------------------------------------------------------------

    def observe(self, features: DecodeFeatures | PrefillFeatures, seconds: float) -> None:
        """Folds one measured step into the model (exponentially weighted least squares)."""
        if seconds <= 0:
            raise ValueError(f"observed seconds={seconds} must be positive")
        fit = self.decode if isinstance(features, DecodeFeatures) else self.prefill
        v = bucket_rank(features.vector(), self.rank_buckets)
        if fit is self.decode and v[3] > 0 and not fit.uses("tokens"):
            return  # a mixed step, and a law with no terms for its prompt tokens: nothing to learn
        fit.observe(v, float(seconds), self.forgetting)
        self._memo.clear()

    # ---- serialization ------------------------------------------------------------------------

    def describe(self) -> str:
        parts = []
        for name, fit in (("decode", self.decode), ("prefill", self.prefill)):
            law = fit.describe_law()
            quality = f"R^2 {fit.report.r2:.3f}, held-out err {fit.report.heldout_rel_err:.1%}"
            if fit.observed:  # the offline fit's figures no longer describe these coefficients
                quality = f"refit on {fit.observed} steps since the profile ({quality} before)"
            parts.append(f"{name} = {law} ({quality})")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"header": dict(self.header), "clamp": self.clamp, "forgetting": self.forgetting,
                "rank_buckets": list(self.rank_buckets), "decode": self.decode.to_dict(),
                "prefill": self.prefill.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> PerfModel:
        for key in ("header", "decode", "prefill"):
            if key not in d:
                raise ValueError(f"not a perf model: no {key!r} key")
        if not isinstance(d.get("clamp", False), bool):
            raise ValueError(f"clamp={d['clamp']!r} must be true or false")
        fits = [LinearFit.from_dict(d[phase]) for phase in ("decode", "prefill")]
        for phase, fit in zip(("decode", "prefill"), fits):
            if any(c < 0 for c in fit.coef):  # an unconstrained fit (an older profile): refit within the law
                before = fit.describe_law()
                fit.coef = tuple(float(c) for c in nonneg_solve(fit.xtx, fit.xty))
                log.warning("perf model: the %s law %s has a negative term; refitted from its samples to %s",
                            phase, before, fit.describe_law())
        return cls(fits[0], fits[1], d["header"], clamp=d.get("clamp", False),
                   forgetting=float(d.get("forgetting", 0.99)), rank_buckets=d.get("rank_buckets", ()))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, key: str = "perf_model", device_type: str = "", model: str = "") -> PerfModel:
        """The model in a JSON file: bare (`save`), or the "model" entry of the profile
        scripts/profile_decode.py writes beside its raw timings. A missing or malformed file is a
        ConfigError naming the setting `key` that gave the path. device_type ("cpu", "cuda") and
        model (its folder): what the model will price; a profile of another is warned about."""
        try:
            data = json.loads(Path(path).read_text())
            loaded = cls.from_dict(data["model"] if isinstance(data, dict) and "decode" not in data and "model" in data
                                   else data)
        except FileNotFoundError:
            raise ConfigError(f"{key}={path}: no such file") from None
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise ConfigError(f"{key}={path}: not a latency model written by scripts/profile_decode.py "
                              f"({type(e).__name__}: {e})") from None
        measured_on = "cpu" if loaded.header["device"] == "cpu" else "cuda"
        other = (device_type and measured_on != device_type) or (model and Path(str(loaded.header["model"])).name
                                                                  != Path(model).name)
        if other:
            log.warning("%s=%s was measured for %s on %s, not for %s on %s: its predictions are that machine's",
                        key, path, loaded.header["model"], loaded.header["device"], model, device_type)
        return loaded
