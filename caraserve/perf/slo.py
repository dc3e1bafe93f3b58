"""The per-token SLO as the scheduler applies it: a latency model's prediction of a step, priced
at the rank bucket the step runs at, against `scheduler.slo_ms`."""

from __future__ import annotations

from caraserve.perf.model import PerfModel


class SloPricing:
    """slo_s: the per-token SLO in seconds (0: none); rank_buckets: the pool's, in which a step
    runs at the smallest bucket holding its largest rank."""

    def __init__(self, perf_model: PerfModel | None, slo_s: float, rank_buckets):
        self.perf_model, self.slo_s, self.rank_buckets = perf_model, slo_s, tuple(rank_buckets)

    @property
    def active(self) -> bool:
        return self.slo_s > 0 and self.perf_model is not None

    def bucket(self, rank: int) -> int:
        """The rank bucket a step whose largest adapter rank is `rank` runs at (0: no adapter)."""
        return next((b for b in self.rank_buckets if b >= rank), rank) if rank else 0

    def decode_fits(self, ranks: list[int]) -> bool:
        """Whether the decode step of rows of these adapter ranks (0: base) is predicted within the SLO."""
        return self.perf_model.decode_s(len(ranks), self.bucket(max(ranks)), sum(ranks)) <= self.slo_s

    def prefill_tokens(self, ranks: list[int], chunk_rank: int, most: int, least: int) -> int:
        """The most prompt tokens (up to `most`, at least `least`) a mixed step may carry beside
        decode rows of `ranks` and still be predicted within the SLO, its prompt tokens priced at
        `chunk_rank`."""
        bucket = self.bucket(max(max(ranks), chunk_rank))

        def fits(tokens: int) -> bool:
            return self.perf_model.decode_s(len(ranks), bucket, sum(ranks), tokens, tokens * chunk_rank) <= self.slo_s

        lo, hi = 0, most  # largest t in [lo, hi] that fits: binary search
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return max(lo, least)
