"""The batch latency model: fitting recovers known laws, out-of-grid handling, online refit, JSON."""

import json

import numpy as np
import pytest

from caraserve.perf.model import DecodeFeatures, PerfModel, PrefillFeatures, make_header

HEADER = make_header("test-device", "test-model", "float32")
RANKS = (8, 16, 32, 64)


def _batches(rng, n, max_bs=32):
    """Batches as a profiling sweep makes them: a batch size and a max rank, lower ranks mixed in."""
    out = []
    for _ in range(n):
        top = int(rng.choice(RANKS))
        bs = int(rng.integers(1, max_bs + 1))
        out.append([top] + [int(r) for r in rng.choice([r for r in RANKS if r <= top], size=bs - 1)])
    return out


def _prompts(rng, n):
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 5))
        out.append((list(rng.integers(8, 512, size=k)), list(rng.choice(RANKS, size=k))))
    return out


def padded_decode(f: DecodeFeatures) -> float:
    return 0.02 + 1e-4 * f.batch_size + 4e-6 * f.batch_size * f.max_rank


def unpadded_decode(f: DecodeFeatures) -> float:
    return 0.015 + 2e-4 * f.batch_size + 3e-6 * f.sum_ranks


def prefill_law(f: PrefillFeatures) -> float:
    return 0.01 + 1e-4 * f.tokens + 2e-7 * f.token_rank


def _samples(law, feats, rng=None, noise=0.0):
    return [(f, law(f) * (1 + (rng.normal(0, noise) if noise else 0.0))) for f in feats]


def _fit(decode_law=padded_decode, noise=0.0, seed=0, max_bs=32, **kw):
    rng = np.random.default_rng(seed)
    dec = _samples(decode_law, [DecodeFeatures.of(b) for b in _batches(rng, 200, max_bs)], rng, noise)
    pre = _samples(prefill_law, [PrefillFeatures.of(t, r) for t, r in _prompts(rng, 120)], rng, noise)
    return PerfModel.fit(dec, pre, HEADER, seed=seed, **kw)


def test_fit_recovers_padded_law_exactly():
    m = _fit()
    assert m.decode.terms == ("1", "bs", "bs*max_rank")
    np.testing.assert_allclose(m.decode.coef, [0.02, 1e-4, 4e-6], rtol=1e-6)
    assert m.prefill.terms == ("1", "tokens", "token_rank")
    np.testing.assert_allclose(m.prefill.coef, [0.01, 1e-4, 2e-7], rtol=1e-6)
    assert m.decode.report.r2 == pytest.approx(1.0, abs=1e-9)
    assert m.decode.report.heldout_rel_err < 1e-9


def test_fit_picks_unpadded_law_when_cost_follows_sum_of_ranks():
    m = _fit(unpadded_decode)
    assert m.decode.terms == ("1", "bs", "sum_ranks")
    np.testing.assert_allclose(m.decode.coef, [0.015, 2e-4, 3e-6], rtol=1e-6)
    padded = next(c for c in m.decode.report.candidates if c["terms"] == ["1", "bs", "bs*max_rank"])
    assert padded["heldout_rel_err"] > 1e-3  # the wrong law is visibly worse on held-out batches
    assert m.decode.report.heldout_rel_err < 1e-9


def test_fit_with_noise_reports_heldout_error_and_high_r2():
    m = _fit(noise=0.02, seed=3)
    assert m.decode.terms == ("1", "bs", "bs*max_rank")
    np.testing.assert_allclose(m.decode.coef, [0.02, 1e-4, 4e-6], rtol=0.1)
    assert 0.005 < m.decode.report.heldout_rel_err < 0.04  # ~ the 2 % noise, not 0, not large
    assert m.decode.report.r2 > 0.95
    assert len(m.decode.report.candidates) == 3
    assert m.decode.report.samples == 200


def test_fit_refuses_too_few_or_bad_samples():
    f = DecodeFeatures.of([8])
    with pytest.raises(ValueError, match="too few"):
        PerfModel.fit([(f, 0.02)] * 3, [(PrefillFeatures.of([10], [8]), 0.01)] * 3, HEADER)
    with pytest.raises(ValueError, match="positive"):
        PerfModel.fit([(f, -1.0)] * 20, [(PrefillFeatures.of([10], [8]), 0.01)] * 20, HEADER)


def test_out_of_grid_clamps_or_extrapolates_as_told():
    extra = _fit(max_bs=16)
    clamped = _fit(max_bs=16, clamp=True)
    big = DecodeFeatures(64, 64, 64 * 64)
    edge = DecodeFeatures(16, 64, 16 * 64)  # the law ignores sum_ranks, so clamping it changes nothing
    assert not extra.in_range(big) and extra.in_range(DecodeFeatures.of([8, 64]))
    assert extra.predict(big) == pytest.approx(padded_decode(big), rel=1e-6)
    assert clamped.predict(big) == pytest.approx(padded_decode(edge), rel=1e-6)
    assert clamped.predict(big) < extra.predict(big)
    # Inside the grid both agree.
    mid = DecodeFeatures.of([8, 32, 16])
    assert clamped.predict(mid) == pytest.approx(extra.predict(mid), rel=1e-9)


def test_online_refit_tracks_slower_hardware():
    m = _fit(forgetting=0.98)
    rng = np.random.default_rng(7)
    probe = DecodeFeatures.of([64] * 24)
    first = DecodeFeatures.of([16] * 8)
    before = m.predict(first)
    m.observe(first, 1.5 * padded_decode(first))
    assert before < m.predict(first) < 1.5 * before  # one observation moves it part of the way
    for b in _batches(rng, 400):
        f = DecodeFeatures.of(b)
        m.observe(f, 1.5 * padded_decode(f))
    assert m.predict(probe) == pytest.approx(1.5 * padded_decode(probe), rel=0.02)
    assert m.decode.observed == 401
    with pytest.raises(ValueError):
        m.observe(first, 0.0)


def test_online_refit_keeps_what_recent_steps_do_not_exercise():
    """Thousands of base-model steps (rank 0) say nothing of the rank terms, and steps of one
    rank make batch size and batch x rank collinear: the refit leaves what they cannot tell
    where the profile put it, so a mixed-rank batch is still priced right afterwards."""
    probe = DecodeFeatures.of([64] * 32)
    for steps in ([DecodeFeatures(bs, 0, 0) for bs in range(1, 33)] * 160,  # base model only
                  [DecodeFeatures(bs, 64, 64 * bs) for bs in (30, 31, 32)] * 1700):  # rank 64 only
        m = _fit()
        for f in steps:
            m.observe(f, padded_decode(f))
        assert m.decode.coef[2] == pytest.approx(4e-6, rel=0.05)
        assert m.predict(probe) == pytest.approx(padded_decode(probe), rel=0.01)
        assert m.predict(DecodeFeatures.of([8] * 32)) == pytest.approx(padded_decode(DecodeFeatures.of([8] * 32)),
                                                                      rel=0.02)
        assert "refit on" in m.describe()


def test_mixed_step_chunk_is_priced_by_the_prefill_laws_token_terms_alone():
    """A decode law without prompt-token terms prices a mixed step's chunk by the prefill law
    less its fixed part; a negative fixed part (a fit's intercept below zero) adds nothing."""
    m = _fit()
    m.prefill.coef = (-0.0076, 1.29e-4, 0.0)  # as a CPU profile's fit: 0.129 ms a token - 7.6 ms
    base = m.decode_s(4, 8, 32)
    assert m.decode_s(4, 8, 32, prefill_tokens=1) - base == pytest.approx(1.29e-4, rel=1e-6)
    assert m.decode_s(4, 8, 32, prefill_tokens=100) - base == pytest.approx(100 * 1.29e-4, rel=1e-6)


def test_online_refit_widens_the_clamped_range():
    m = _fit(max_bs=16, clamp=True)
    big = DecodeFeatures(40, 64, 40 * 64)
    m.observe(big, padded_decode(big))
    assert m.in_range(big)
    assert m.predict(big) == pytest.approx(padded_decode(big), rel=0.05)


def test_json_round_trip_keeps_predictions_header_and_online_state():
    m = _fit(noise=0.01, rank_buckets=(8, 16, 32, 64))
    m.observe(DecodeFeatures.of([8, 8]), 0.03)
    d = json.loads(json.dumps(m.to_dict()))
    for key in ("device", "model", "dtype", "torch", "created"):
        assert d["header"][key] == m.header[key]
    m2 = PerfModel.from_dict(d)
    for f in (DecodeFeatures.of([8, 64, 16]), DecodeFeatures(40, 20, 400), PrefillFeatures.of([100, 7], [8, 64])):
        assert m2.predict(f) == pytest.approx(m.predict(f), rel=1e-12)
    assert m2.decode.report == m.decode.report
    # The sufficient statistics travel too: the same next observation lands both in the same place.
    f = DecodeFeatures.of([32] * 10)
    m.observe(f, 0.05)
    m2.observe(f, 0.05)
    assert m2.predict(f) == pytest.approx(m.predict(f), rel=1e-9)


def test_save_load_and_header_is_required(tmp_path):
    m = PerfModel.linear()
    m.save(tmp_path / "p.json")
    assert PerfModel.load(tmp_path / "p.json").decode_s(8, 32, 256) == pytest.approx(m.decode_s(8, 32, 256))
    d = m.to_dict()
    del d["header"]["torch"]
    with pytest.raises(ValueError, match="torch"):
        PerfModel.from_dict(d)


def test_rank_buckets_round_max_rank_up():
    m = _fit(rank_buckets=(8, 16, 32, 64))
    assert m.decode_s(4, 20, 80) == pytest.approx(m.decode_s(4, 32, 80))
    assert m.decode_s(4, 20, 80) > m.decode_s(4, 16, 80)


def test_paper_like_linear_model_calibration():
    m = PerfModel.linear()
    assert 0.019 <= m.decode_s(1, 64, 64) <= 0.021  # paper: ~20 ms at batch size 1
    assert m.decode_s(32, 64, 32 * 64) == pytest.approx(0.030, rel=0.02)  # paper: ~30 ms at bs 32, rank 64
    ratio = m.decode_s(32, 64, 32 * 64) / m.decode_s(32, 8, 32 * 8)
    assert 1.2 < ratio < 1.35  # paper: rank mix alone moves a batch by ~28 %
    per_token = (m.prefill_s(1, 1024, 64, 1024 * 64) - m.prefill_s(1, 512, 64, 512 * 64)) / 512
    assert 1e-4 <= per_token <= 1.1e-4  # compute bound: ~0.1 ms per prompt token, ~5 % more at rank 64
    assert m.prefill_s(1, 256, 32, 256 * 32) / m.decode_s(32, 32, 32 * 32) == pytest.approx(1.5, rel=0.2)
    assert m.decode_s(0, 0, 0) == 0.0 and m.prefill_s(0, 0, 0, 0) == 0.0


def mixed_step(f: DecodeFeatures) -> float:
    """A decode step that also computes prompt chunks: per-token cost below a prefill's (the
    weights are read once for both)."""
    return padded_decode(f) + 6e-5 * f.prefill_tokens + 1.5e-7 * f.prefill_token_rank


def _mixed_features(rng, n):
    out = []
    for b in _batches(rng, n):
        k = int(rng.integers(0, 3))  # 0: a plain decode step
        chunks = [int(t) for t in rng.integers(16, 512, size=k)]
        out.append(DecodeFeatures.of(b, chunks, [int(r) for r in rng.choice(RANKS, size=k)]))
    return out


def test_fit_learns_mixed_steps_from_mixed_samples():
    rng = np.random.default_rng(5)
    dec = _samples(mixed_step, _mixed_features(rng, 300))
    pre = _samples(prefill_law, [PrefillFeatures.of(t, r) for t, r in _prompts(rng, 120)])
    m = PerfModel.fit(dec, pre, HEADER)
    assert m.decode.terms == ("1", "bs", "bs*max_rank", "tokens", "token_rank")
    assert all("tokens" in c["terms"] for c in m.decode.report.candidates)  # mixed samples: mixed laws only
    np.testing.assert_allclose(m.decode.coef, [0.02, 1e-4, 4e-6, 6e-5, 1.5e-7], rtol=1e-6)
    f = DecodeFeatures.of([16] * 8, [300, 40], [64, 8])
    assert (f.batch_size, f.max_rank, f.sum_ranks, f.prefill_tokens, f.prefill_token_rank) == (8, 64, 128, 340, 19520)
    assert m.predict(f) == pytest.approx(mixed_step(f), rel=1e-9)
    assert m.decode_s(8, 64, 128, 340, 19520) == pytest.approx(mixed_step(f), rel=1e-9)
    m2 = PerfModel.from_dict(json.loads(json.dumps(m.to_dict())))
    assert m2.predict(f) == pytest.approx(m.predict(f), rel=1e-12)


def test_decode_law_without_mixed_terms_prices_prompt_tokens_by_the_prefill_law():
    m = _fit()  # profiled without mixed steps
    assert "tokens" not in m.decode.terms
    plain = DecodeFeatures.of([16] * 8)
    mixed = DecodeFeatures.of([16] * 8, [256], [32])
    extra = prefill_law(PrefillFeatures.of([256], [32])) - 0.01  # the prefill law less its fixed part
    assert m.predict(mixed) == pytest.approx(padded_decode(mixed) + extra, rel=1e-9)  # padded to rank 32
    assert m.predict(mixed) > m.predict(plain) + extra
    # Such a law learns nothing from mixed steps (the prefill law's error would leak into its
    # terms); plain decode steps still refit it.
    before, observed = m.predict(plain), m.decode.observed
    for _ in range(50):
        m.observe(mixed, 3 * (padded_decode(mixed) + extra))
    assert m.predict(plain) == before and m.decode.observed == observed
    m.observe(plain, 1.3 * padded_decode(plain))
    assert m.predict(plain) > before
