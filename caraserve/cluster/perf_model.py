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

All times are seconds. Nothing here imports torch: the model is shared by the engine's scheduler
and the cluster policies and must load in a router process.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Every phase's features live in one vector, so one term vocabulary serves both phases.
VARS = ("batch_size", "max_rank", "sum_ranks", "tokens", "token_rank")
Vector = tuple[float, float, float, float, float]

TERMS: dict[str, Callable[[Vector], float]] = {
    "1": lambda v: 1.0,
    "bs": lambda v: v[0],
    "bs*max_rank": lambda v: v[0] * v[1],
    "sum_ranks": lambda v: v[2],
    "tokens": lambda v: v[3],
    "tokens*max_rank": lambda v: v[3] * v[1],
    "token_rank": lambda v: v[4],
}

# Padded kernel, unpadded kernel, or both (a kernel that pads within rank buckets).
DECODE_CANDIDATES = (("1", "bs", "bs*max_rank"), ("1", "bs", "sum_ranks"), ("1", "bs", "bs*max_rank", "sum_ranks"))
PREFILL_CANDIDATES = (("1", "tokens"), ("1", "tokens", "tokens*max_rank"), ("1", "tokens", "token_rank"),
                      ("1", "tokens", "tokens*max_rank", "token_rank"))

HEADER_KEYS = ("device", "model", "dtype", "torch", "created")

# A candidate with more terms must beat the simplest adequate one by more than this on held-out
# relative error; otherwise noise alone would decide between nested feature sets.
PARSIMONY_REL = 0.05
PARSIMONY_ABS = 1e-4

MEMO_ENTRIES = 1 << 18


@dataclass(frozen=True)
class DecodeFeatures:
    """One decode step: every running request contributes one token."""

    batch_size: int
    max_rank: int
    sum_ranks: int

    @classmethod
    def of(cls, ranks: Sequence[int]) -> DecodeFeatures:
        return cls(len(ranks), max(ranks, default=0), sum(ranks))

    def vector(self) -> Vector:
        return (self.batch_size, self.max_rank, self.sum_ranks, self.batch_size, self.sum_ranks)


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


@dataclass(frozen=True)
class FitReport:
    """How a phase's model was chosen. heldout_rel_err: mean |pred - y| / y on the test split."""

    terms: tuple[str, ...]
    r2: float
    heldout_rel_err: float
    samples: int
    candidates: tuple[dict, ...] = ()

    def to_dict(self) -> dict:
        return {"terms": list(self.terms), "r2": self.r2, "heldout_rel_err": self.heldout_rel_err,
                "samples": self.samples, "candidates": list(self.candidates)}

    @classmethod
    def from_dict(cls, d: dict) -> FitReport:
        return cls(tuple(d["terms"]), float(d["r2"]), float(d["heldout_rel_err"]), int(d["samples"]),
                   tuple(d.get("candidates", ())))


def _design(terms: Sequence[str], vectors: Sequence[Vector]) -> np.ndarray:
    return np.array([[TERMS[t](v) for t in terms] for v in vectors], dtype=np.float64)


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float(((y - pred) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)


class LinearFit:
    """y = sum_k coef_k * term_k(v), with exponentially weighted sufficient statistics
    (X^T W X and X^T W y) from which `observe` re-solves the coefficients."""

    def __init__(self, terms: Sequence[str], coef: Sequence[float], lo: Sequence[float], hi: Sequence[float],
                 xtx: np.ndarray, xty: np.ndarray, report: FitReport):
        unknown = [t for t in terms if t not in TERMS]
        if unknown:
            raise ValueError(f"unknown term(s) {unknown}; known: {sorted(TERMS)}")
        self.terms = tuple(terms)
        self.coef = tuple(float(c) for c in coef)
        self.lo = [float(x) for x in lo]
        self.hi = [float(x) for x in hi]
        self.xtx = np.asarray(xtx, dtype=np.float64).reshape(len(terms), len(terms))
        self.xty = np.asarray(xty, dtype=np.float64).reshape(len(terms))
        self.report = report
        self.observed = 0
        self._fns = tuple(TERMS[t] for t in self.terms)

    @classmethod
    def from_samples(cls, terms: Sequence[str], vectors: Sequence[Vector], y: np.ndarray,
                     report: FitReport | None = None) -> LinearFit:
        x = _design(terms, vectors)
        coef = np.linalg.lstsq(x, y, rcond=None)[0]
        arr = np.array(vectors, dtype=np.float64)
        if report is None:
            report = FitReport(tuple(terms), _r2(y, x @ coef), float("nan"), len(y))
        return cls(terms, coef, arr.min(axis=0), arr.max(axis=0), x.T @ x, x.T @ y, report)

    def predict(self, v: Vector) -> float:
        y = 0.0
        for c, f in zip(self.coef, self._fns):
            y += c * f(v)
        return y

    def clamp(self, v: Vector) -> Vector:
        return tuple(min(max(x, lo), hi) for x, lo, hi in zip(v, self.lo, self.hi))

    def in_range(self, v: Vector) -> bool:
        return all(lo <= x <= hi for x, lo, hi in zip(v, self.lo, self.hi))

    def observe(self, v: Vector, y: float, forgetting: float) -> None:
        x = np.array([f(v) for f in self._fns], dtype=np.float64)
        self.xtx = forgetting * self.xtx + np.outer(x, x)
        self.xty = forgetting * self.xty + x * y
        self.coef = tuple(float(c) for c in np.linalg.lstsq(self.xtx, self.xty, rcond=None)[0])
        # What was observed has been measured, so it widens the range clamping trusts.
        self.lo = [min(a, b) for a, b in zip(self.lo, v)]
        self.hi = [max(a, b) for a, b in zip(self.hi, v)]
        self.observed += 1

    def to_dict(self) -> dict:
        return {"terms": list(self.terms), "coef": list(self.coef),
                "lo": dict(zip(VARS, self.lo)), "hi": dict(zip(VARS, self.hi)),
                "xtx": self.xtx.tolist(), "xty": self.xty.tolist(), "observed": self.observed,
                "report": self.report.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> LinearFit:
        fit = cls(d["terms"], d["coef"], [d["lo"][k] for k in VARS], [d["hi"][k] for k in VARS],
                  np.array(d["xtx"]), np.array(d["xty"]), FitReport.from_dict(d["report"]))
        fit.observed = int(d.get("observed", 0))
        return fit


def select_fit(vectors: Sequence[Vector], seconds: Sequence[float], candidates: Sequence[Sequence[str]],
               rng: np.random.Generator, test_fraction: float) -> LinearFit:
    """Fit every candidate on a train split, keep the simplest whose held-out error is within
    the parsimony margin of the best, and refit it on all samples."""
    y = np.asarray(seconds, dtype=np.float64)
    n = len(y)
    if n != len(vectors):
        raise ValueError(f"{len(vectors)} feature rows but {n} timings")
    if np.any(y <= 0):
        raise ValueError("timings must be positive seconds")
    n_test = max(1, int(round(n * test_fraction)))
    perm = rng.permutation(n)
    test, train = perm[:n_test], perm[n_test:]
    tried = []
    for terms in candidates:
        if len(train) < len(terms) + 1:
            continue
        x_tr = _design(terms, [vectors[i] for i in train])
        coef = np.linalg.lstsq(x_tr, y[train], rcond=None)[0]
        pred = _design(terms, [vectors[i] for i in test]) @ coef
        err = float(np.mean(np.abs(pred - y[test]) / y[test]))
        tried.append({"terms": list(terms), "heldout_rel_err": err, "r2_train": _r2(y[train], x_tr @ coef)})
    if not tried:
        raise ValueError(f"{n} samples are too few to fit and test any of {list(candidates)}")
    best = min(c["heldout_rel_err"] for c in tried)
    ok = [c for c in tried if c["heldout_rel_err"] <= best * (1 + PARSIMONY_REL) + PARSIMONY_ABS]
    chosen = min(ok, key=lambda c: (len(c["terms"]), c["heldout_rel_err"]))
    fit = LinearFit.from_samples(chosen["terms"], vectors, y)
    fit.report = FitReport(tuple(chosen["terms"]), fit.report.r2, chosen["heldout_rel_err"], n, tuple(tried))
    return fit


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
        for samples, candidates in ((decode_samples, DECODE_CANDIDATES), (prefill_samples, PREFILL_CANDIDATES)):
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
            x = _design(terms, grid)
            y = x @ coef
            arr = np.array(grid, dtype=np.float64)
            report = FitReport(terms, 1.0, 0.0, len(grid))
            fits.append(LinearFit(terms, coef, arr.min(axis=0), arr.max(axis=0), x.T @ x, x.T @ y, report))
        header = make_header("A100-80GB (paper-calibrated, not measured)", "Llama-2-7B", "float16",
                             source="linear(paper-like)")
        return cls(fits[0], fits[1], header, clamp=clamp, forgetting=forgetting)

    # ---- prediction ---------------------------------------------------------------------------

    def _predict(self, fit: LinearFit, v: Vector) -> float:
        v = bucket_rank(v, self.rank_buckets)
        if self.clamp:
            v = fit.clamp(v)
        return max(fit.predict(v), 0.0)

    def decode_s(self, batch_size: int, max_rank: int, sum_ranks: int) -> float:
        """Seconds of one decode step over `batch_size` running requests (0 for an empty batch)."""
        if batch_size <= 0:
            return 0.0
        key = (0, batch_size, max_rank, sum_ranks)
        y = self._memo.get(key)
        if y is None:
            y = self._memoize(key, self._predict(self.decode, (batch_size, max_rank, sum_ranks, batch_size, sum_ranks)))
        return y

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
            return self.decode_s(features.batch_size, features.max_rank, features.sum_ranks)
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
        fit.observe(bucket_rank(features.vector(), self.rank_buckets), float(seconds), self.forgetting)
        self._memo.clear()

    # ---- serialization ------------------------------------------------------------------------

    def describe(self) -> str:
        parts = []
        for name, fit in (("decode", self.decode), ("prefill", self.prefill)):
            law = " + ".join(f"{c * 1e3:.4g}ms*{t}" if t != "1" else f"{c * 1e3:.4g}ms"
                             for t, c in zip(fit.terms, fit.coef))
            parts.append(f"{name} = {law} (R^2 {fit.report.r2:.3f}, held-out err "
                         f"{fit.report.heldout_rel_err:.1%})")
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
        return cls(LinearFit.from_dict(d["decode"]), LinearFit.from_dict(d["prefill"]), d["header"],
                   clamp=bool(d.get("clamp", False)), forgetting=float(d.get("forgetting", 0.99)),
                   rank_buckets=d.get("rank_buckets", ()))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PerfModel:
        return cls.from_dict(json.loads(Path(path).read_text()))
