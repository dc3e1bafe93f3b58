"""Linear laws over batch features: least-squares fits, selection among candidate feature sets by
held-out error, and exponentially weighted sufficient statistics for online refits. The latency
model (model.py) is built from these. Nothing here imports torch.

Fits minimize relative error (each sample weighted by 1 / its time squared), the error the
selection judges and the one an SLO check suffers: unweighted, a profile's long prefills
(hundreds of ms) decide the law, and a short one's fixed cost vanishes into them. Every term
is a cost, so none may come out negative (`nonneg_solve`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

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
# The VARS each term reads: clamping and range checks look only at what a fit uses (a decode fit
# without prefill terms ignores its vectors' prefill fields, whatever their range).
TERM_VARS: dict[str, tuple[int, ...]] = {
    "1": (), "bs": (0,), "bs*max_rank": (0, 1), "sum_ranks": (2,), "tokens": (3,),
    "tokens*max_rank": (3, 1), "token_rank": (4,),
}

# A candidate with more terms must beat the simplest adequate one by more than this on held-out
# relative error; otherwise noise alone would decide between nested feature sets.
PARSIMONY_REL = 0.05
PARSIMONY_ABS = 1e-4
# The offline profile's evidence stays in every online refit as this many observations' worth,
# never forgotten: traffic that exercises only some terms (base-model requests alone leave the
# rank terms at zero; one rank makes batch size and batch x rank collinear) leaves the others
# where the profile put them instead of decaying them to whatever fits the recent steps. One
# is enough for that (where recent steps say nothing, it is all there is) and little beside the
# ~1 / (1 - forgetting) observations that track a real drift where they do.
PRIOR_SAMPLES = 1


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


def nonneg_solve(xtx: np.ndarray, xty: np.ndarray) -> np.ndarray:
    """argmin over c >= 0 of |X c - y|^2, from X^T X and X^T y. Every term of a latency law is a
    cost (a fixed part, per row, per rank, per token), so none may be negative: an unconstrained
    fit of noisy or one-sided data (a single rank, short prompts) trades a negative term against
    a too-large one and prices some batches at zero. Lawson and Hanson's active-set method on the
    normal equations: terms are freed one at a time, each step the most wanted by the gradient,
    and a free term that would turn negative is held at zero again; a few solves of at most k
    terms, where trying every subset of free terms (exact too) cost up to 2^k."""
    k = len(xty)
    coef = np.linalg.lstsq(xtx, xty, rcond=None)[0] if k else np.zeros(0)
    if np.all(coef >= 0):
        return coef
    tol = 1e-12 * max(float(np.abs(xty).max()), 1e-300)  # of the gradient, which has xty's scale
    x, free = np.zeros(k), np.zeros(k, dtype=bool)
    for _ in range(3 * k + 3):  # each pass frees a term; holding terms back ends in at most k more
        grad = xty - xtx @ x  # minus half the objective's gradient: > 0 where raising a term helps
        wanted = np.where(free, -np.inf, grad)
        if not (~free).any() or wanted.max() <= tol:
            break
        free[int(np.argmax(wanted))] = True
        while True:
            idx = np.flatnonzero(free)
            trial = np.zeros(k)
            trial[idx] = np.linalg.lstsq(xtx[np.ix_(idx, idx)], xty[idx], rcond=None)[0]
            if np.all(trial[idx] > 0):
                x = trial
                break
            # step from x toward the trial as far as every free term stays >= 0; hold those at 0
            bad = idx[trial[idx] <= 0]
            alpha = min(1.0, float(np.min(x[bad] / np.maximum(x[bad] - trial[bad], 1e-300))))
            x = x + alpha * (trial - x)
            free &= x > 1e-12 * max(float(np.abs(x).max()), 1e-300)  # (those the step brought to zero)
            x[~free] = 0.0
            if not free.any():
                break
    return x


def identifiable(x: np.ndarray) -> bool:
    """Whether the samples (rows of the design matrix x) tell every term apart from the others:
    one rank makes batch size and batch x rank the same column, one prompt length makes the fixed
    part and the per-token one the same; such a term's coefficient is whatever the split of the
    noise makes it."""
    scaled = x / np.maximum(np.abs(x).max(axis=0), 1e-300)  # columns of one scale: the rank test's tolerance fits all
    return x.shape[0] >= x.shape[1] and np.linalg.matrix_rank(scaled) == x.shape[1]


def design(terms: Sequence[str], vectors: Sequence[Vector]) -> np.ndarray:
    return np.array([[TERMS[t](v) for t in terms] for v in vectors], dtype=np.float64)


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float(((y - pred) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)


def weighted_stats(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """X^T W X and X^T W y of samples (rows of x, times y > 0) with W = diag(1 / y^2)."""
    xw = x / y[:, None]
    return xw.T @ xw, xw.T @ np.ones_like(y)


class LinearFit:
    """y = sum_k coef_k * term_k(v), with exponentially weighted sufficient statistics
    (X^T W X and X^T W y, W = 1 / y^2 per sample) from which `observe` re-solves the
    coefficients, beside a fixed prior: the offline fit's statistics scaled to PRIOR_SAMPLES
    observations."""

    def __init__(self, terms: Sequence[str], coef: Sequence[float], lo: Sequence[float], hi: Sequence[float],
                 xtx: np.ndarray, xty: np.ndarray, report: FitReport, prior: tuple | None = None):
        unknown = [t for t in terms if t not in TERMS]
        if unknown:
            raise ValueError(f"unknown term(s) {unknown}; known: {sorted(TERMS)}")
        if len(coef) != len(terms) or not all(math.isfinite(c) for c in coef):
            raise ValueError(f"coefficients {list(coef)} must be {len(terms)} finite numbers, one per term "
                             f"{list(terms)}")
        self.terms = tuple(terms)
        self.coef = tuple(float(c) for c in coef)
        self.lo = [float(x) for x in lo]
        self.hi = [float(x) for x in hi]
        self.xtx = np.asarray(xtx, dtype=np.float64).reshape(len(terms), len(terms))
        self.xty = np.asarray(xty, dtype=np.float64).reshape(len(terms))
        self.report = report
        self.observed = 0
        if prior is None:  # the fit as it stands is the offline one: its evidence, scaled
            w = PRIOR_SAMPLES / max(report.samples, 1)
            prior = (self.xtx * w, self.xty * w)
        self.prior_xtx = np.asarray(prior[0], dtype=np.float64).reshape(self.xtx.shape)
        self.prior_xty = np.asarray(prior[1], dtype=np.float64).reshape(self.xty.shape)
        self._fns = tuple(TERMS[t] for t in self.terms)
        self._used = sorted({i for t in self.terms for i in TERM_VARS[t]})

    @classmethod
    def from_samples(cls, terms: Sequence[str], vectors: Sequence[Vector], y: np.ndarray,
                     report: FitReport | None = None) -> LinearFit:
        x = design(terms, vectors)
        xtx, xty = weighted_stats(x, y)
        coef = nonneg_solve(xtx, xty)
        arr = np.array(vectors, dtype=np.float64)
        if report is None:
            report = FitReport(tuple(terms), _r2(y, x @ coef), float("nan"), len(y))
        return cls(terms, coef, arr.min(axis=0), arr.max(axis=0), xtx, xty, report)

    def predict(self, v: Vector) -> float:
        y = 0.0
        for c, f in zip(self.coef, self._fns):
            y += c * f(v)
        return y

    def describe_law(self) -> str:
        """The law in milliseconds, e.g. "3.2ms + 0.21ms*bs"."""
        return " + ".join(f"{c * 1e3:.4g}ms*{t}" if t != "1" else f"{c * 1e3:.4g}ms"
                          for t, c in zip(self.terms, self.coef))

    def uses(self, term: str) -> bool:
        return term in self.terms

    def clamp(self, v: Vector) -> Vector:
        out = list(v)
        for i in self._used:
            out[i] = min(max(v[i], self.lo[i]), self.hi[i])
        return tuple(out)

    def in_range(self, v: Vector) -> bool:
        return all(self.lo[i] <= v[i] <= self.hi[i] for i in self._used)

    def observe(self, v: Vector, y: float, forgetting: float) -> None:
        if not y > 0:
            return
        x = np.array([f(v) for f in self._fns], dtype=np.float64) / y
        self.xtx = forgetting * self.xtx + np.outer(x, x)
        self.xty = forgetting * self.xty + x
        coef = nonneg_solve(self.xtx + self.prior_xtx, self.xty + self.prior_xty)
        self.coef = tuple(float(c) for c in coef)
        # What was observed has been measured, so it widens the range clamping trusts.
        self.lo = [min(a, b) for a, b in zip(self.lo, v)]
        self.hi = [max(a, b) for a, b in zip(self.hi, v)]
        self.observed += 1

    def to_dict(self) -> dict:
        return {"terms": list(self.terms), "coef": list(self.coef),
                "lo": dict(zip(VARS, self.lo)), "hi": dict(zip(VARS, self.hi)),
                "weights": "relative", "xtx": self.xtx.tolist(), "xty": self.xty.tolist(), "observed": self.observed,
                "prior_xtx": self.prior_xtx.tolist(), "prior_xty": self.prior_xty.tolist(),
                "report": self.report.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> LinearFit:
        if d.get("weights") != "relative":
            raise ValueError("the fit's statistics are unweighted (written before fits minimized relative error): "
                             "refit its profile with scripts/profile_decode.py --refit FILE")
        prior = (np.array(d["prior_xtx"]), np.array(d["prior_xty"])) if "prior_xtx" in d else None
        fit = cls(d["terms"], d["coef"], [d["lo"][k] for k in VARS], [d["hi"][k] for k in VARS],
                  np.array(d["xtx"]), np.array(d["xty"]), FitReport.from_dict(d["report"]), prior)
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
        x_tr = design(terms, [vectors[i] for i in train])
        if not identifiable(design(terms, vectors)):
            continue
        coef = nonneg_solve(*weighted_stats(x_tr, y[train]))
        pred = design(terms, [vectors[i] for i in test]) @ coef
        err = float(np.mean(np.abs(pred - y[test]) / y[test]))
        tried.append({"terms": list(terms), "heldout_rel_err": err, "r2_train": _r2(y[train], x_tr @ coef)})
    if not tried:
        raise ValueError(f"{n} samples are too few, or too alike (one rank, one prompt length), to fit and test "
                         f"any of {list(candidates)}")
    best = min(c["heldout_rel_err"] for c in tried)
    ok = [c for c in tried if c["heldout_rel_err"] <= best * (1 + PARSIMONY_REL) + PARSIMONY_ABS]
    chosen = min(ok, key=lambda c: (len(c["terms"]), c["heldout_rel_err"]))
    fit = LinearFit.from_samples(chosen["terms"], vectors, y)
    fit.report = FitReport(tuple(chosen["terms"]), fit.report.r2, chosen["heldout_rel_err"], n, tuple(tried))
    return fit
