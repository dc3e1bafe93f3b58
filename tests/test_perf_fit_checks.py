"""The latency laws' fitting: no negative cost terms (offline, online, or in a loaded profile),
laws whose terms the samples cannot tell apart never chosen, relative error minimized, and
profiles that cannot be right refused by name."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from caraserve.perf.linear_fit import identifiable, nonneg_solve, select_fit
from caraserve.perf.model import DecodeFeatures, PerfModel, PrefillFeatures, make_header

HEADER = make_header("test", "tiny", "float32")


def _brute_nonneg(x: np.ndarray, y: np.ndarray) -> float:
    """The least residual over c >= 0, by trying every subset of free terms."""
    best = float(y @ y)
    for size in range(1, x.shape[1] + 1):
        for keep in itertools.combinations(range(x.shape[1]), size):
            c = np.linalg.lstsq(x[:, keep], y, rcond=None)[0]
            if np.all(c >= 0):
                best = min(best, float(((x[:, keep] @ c - y) ** 2).sum()))
    return best


def test_nonneg_solve_is_the_constrained_least_squares_optimum():
    rng = np.random.default_rng(0)
    negative_seen = 0
    for _ in range(40):
        x = np.abs(rng.normal(size=(30, 4)))
        y = x @ rng.normal(size=4) + rng.normal(scale=0.1, size=30)
        c = nonneg_solve(x.T @ x, x.T @ y)
        negative_seen += bool(np.any(np.linalg.lstsq(x, y, rcond=None)[0] < 0))
        assert np.all(c >= 0)
        assert float(((x @ c - y) ** 2).sum()) == pytest.approx(_brute_nonneg(x, y), rel=1e-9, abs=1e-12)
    assert negative_seen > 10  # the constraint was tested, not only the easy case


def test_short_prefills_keep_a_fixed_cost_the_long_ones_would_fit_away():
    """Timings of a fixed 5 ms plus 0.1 ms per token, noisier at the long end: the unweighted,
    unconstrained fit gave a negative fixed part and priced 16 tokens at zero."""
    rng = np.random.default_rng(1)
    samples = []
    for tokens in (16, 64, 256, 1024, 4096, 8192):
        for _ in range(6):
            noise = 1 + rng.normal(scale=0.05) + (0.3 if tokens == 8192 else 0.0) * rng.random()
            samples.append((PrefillFeatures.of([tokens], [8]), (0.005 + 1e-4 * tokens) * noise))
    decode = [(DecodeFeatures.of([8] * b + [16] * (b % 3)), 0.003 + 2e-4 * b) for b in range(1, 33)]
    model = PerfModel.fit(decode, samples, HEADER)
    assert all(c >= 0 for c in model.prefill.coef)
    assert model.prefill_s(1, 16, 8, 16 * 8) == pytest.approx(0.0066, rel=0.25)


def test_a_law_the_samples_cannot_identify_is_not_chosen():
    """One rank only: batch size and batch x rank are one column, so the laws with a rank term
    are skipped (their split of the cost would be arbitrary) and the error says why."""
    rng = np.random.default_rng(2)
    vectors = [DecodeFeatures.of([8] * b).vector() for b in range(1, 33)]
    seconds = [0.003 + 0.0002 * v[0] for v in vectors]
    assert not identifiable(np.array([[1, v[0], v[0] * v[1]] for v in vectors], dtype=float))
    fit = select_fit(vectors, seconds, [("1", "bs", "bs*max_rank"), ("1", "bs")], rng, 0.25)
    assert fit.terms == ("1", "bs")
    with pytest.raises(ValueError, match="too alike"):
        select_fit(vectors, seconds, [("1", "bs", "bs*max_rank")], rng, 0.25)


def test_online_refits_never_price_a_term_below_zero():
    m = PerfModel.linear()
    for _ in range(300):  # steps whose cost falls as batches grow: an unconstrained refit goes negative
        m.observe(DecodeFeatures.of([8]), 0.020)
        m.observe(DecodeFeatures.of([8] * 32), 0.012)
    assert all(c >= 0 for c in m.decode.coef)
    assert m.decode_s(1, 8, 8) > 0


@pytest.mark.parametrize("edit, says", [
    (lambda d: d["decode"].__setitem__("coef", [float("nan")] * len(d["decode"]["terms"])), "finite"),
    (lambda d: d["decode"].__setitem__("coef", d["decode"]["coef"][:-1]), "one per term"),
    (lambda d: d.__setitem__("clamp", "false"), "clamp='false' must be true or false"),
    (lambda d: d["prefill"].pop("weights"), "--refit"),
])
def test_profiles_that_cannot_be_right_are_refused(tmp_path, edit, says):
    d = PerfModel.linear().to_dict()
    edit(d)
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(Exception, match=says):
        PerfModel.load(tmp_path / "p.json")


def test_a_loaded_negative_term_is_refitted_from_the_profiles_samples(tmp_path, caplog):
    d = PerfModel.linear().to_dict()
    d["prefill"]["coef"][0] = -0.004  # the fixed part, hand-edited
    model = PerfModel.from_dict(d)
    assert all(c >= 0 for c in model.prefill.coef) and "refitted from its samples" in caplog.text
    want = PerfModel.linear().prefill_s(1, 256, 64, 256 * 64)
    assert model.prefill_s(1, 256, 64, 256 * 64) == pytest.approx(want, rel=1e-6)


def test_a_profile_of_another_device_or_model_is_warned_about(tmp_path, caplog):
    PerfModel.linear().save(tmp_path / "p.json")  # its header: Llama-2-7B on an A100
    PerfModel.load(tmp_path / "p.json", "scheduler.perf_model", "cpu", "/models/tiny")
    assert "was measured for Llama-2-7B on A100" in caplog.text and "not for /models/tiny on cpu" in caplog.text
    caplog.clear()
    PerfModel.load(tmp_path / "p.json", "scheduler.perf_model", "cuda", "/models/Llama-2-7B")
    assert "was measured" not in caplog.text
