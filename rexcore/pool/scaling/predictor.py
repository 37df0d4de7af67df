"""What the predictive policy knows about the load: a smoothed arrival rate with a
trend, the mean service time, and the number of slots a queue-wait objective needs."""

from __future__ import annotations

import math
from collections import deque

__all__ = ["LoadPredictor", "erlang_c_slots"]


class LoadPredictor:
    """Arrival rate by exponential smoothing (``alpha``, fast; ``level_alpha``, the slow
    steady level), the mean service time as the ratio of smoothed busy seconds to smoothed
    completions (``service_alpha``; a mean of per-interval means would let one interval
    with a single long action swing it, and a short memory lets a few long actions swing
    it by half), and the trend of the arrival rate over the last ``trend_samples``
    observations.

    The trend is fitted to the raw per-interval rates, not the smoothed ones (those are
    correlated, which would make any wiggle look significant), and only the part that
    stands out of the sampling noise counts (slope minus ``trend_significance`` standard
    errors, three by default): a noisy slope multiplied by a five-minute start-up time
    would buy workers nobody needs, and at two standard errors a flat load still showed a
    "trend" a few percent of the time, each one a grow followed by a shrink.
    """

    def __init__(self, alpha: float, trend_samples: int, initial_service_s: float,
                 service_alpha: float | None = None, level_alpha: float | None = None,
                 trend_significance: float = 3.0) -> None:
        self.alpha = alpha
        self.trend_significance = trend_significance
        self.level_alpha = alpha if level_alpha is None else level_alpha
        self.level: float | None = None
        #: Samples the level has averaged since it (re)started, up to its memory.
        self._level_samples = 0
        self.service_alpha = alpha if service_alpha is None else service_alpha
        self.rate: float | None = None
        self._initial_service_s = initial_service_s
        self._done_rate = 0.0
        self._busy_rate = 0.0
        self._samples: deque[tuple[float, float]] = deque(maxlen=trend_samples)
        self._last: tuple[float, int, int, float] | None = None

    @property
    def service_s(self) -> float:
        if self._done_rate <= 0:
            return self._initial_service_s
        return self._busy_rate / self._done_rate

    @property
    def last_rate(self) -> float | None:
        """The arrival rate of the last interval alone (None before two observations)."""
        return self._samples[-1][1] if self._samples else None

    @property
    def level_samples(self) -> float:
        """How many intervals the steady level is as noisy as the plain mean of: its
        memory, or fewer since it (re)started."""
        return min(self._level_samples, (2 - self.level_alpha) / self.level_alpha)

    def recent_rate(self, samples: int) -> float:
        recent = list(self._samples)[-samples:]
        return sum(r for _, r in recent) / len(recent) if recent else (self.rate or 0.0)

    def restart_level(self, rate: float) -> None:
        """The load has moved: forget the old steady level and start again at ``rate``
        (the fast rate, worth about ``1 / alpha`` samples). Until the level's memory
        has filled again, it is the mean of the samples since, not a slow EWMA still
        carrying the noise of where it restarted."""
        self.level = rate
        self._level_samples = max(1, round(1 / self.alpha))

    def _smooth(self, old: float | None, sample: float, alpha: float | None = None) -> float:
        alpha = self.alpha if alpha is None else alpha
        return sample if old is None else alpha * sample + (1 - alpha) * old

    def observe(self, now: float, arrivals: int, completions: int, busy_s: float) -> None:
        last, self._last = self._last, (now, arrivals, completions, busy_s)
        if last is None or now <= last[0]:
            return
        elapsed = now - last[0]
        sample = max(0, arrivals - last[1]) / elapsed
        self.rate = self._smooth(self.rate, sample)
        self._level_samples += 1
        self.level = self._smooth(self.level, sample,
                                  max(self.level_alpha, 1 / self._level_samples))
        self._samples.append((now, sample))
        finished = completions - last[2]
        if finished > 0 or self._done_rate > 0:
            self._done_rate = self._smooth(self._done_rate or None, max(0, finished) / elapsed,
                                           self.service_alpha)
            self._busy_rate = self._smooth(self._busy_rate or None,
                                           max(busy_s - last[3], 0.0) / elapsed,
                                           self.service_alpha)

    def trend(self) -> float:
        """The rise of the arrival rate per second, if significant; else 0."""
        n = len(self._samples)
        if n < 3:
            return 0.0
        mean_t = sum(t for t, _ in self._samples) / n
        mean_r = sum(r for _, r in self._samples) / n
        sxx = sum((t - mean_t) ** 2 for t, _ in self._samples)
        if sxx <= 0:
            return 0.0
        slope = sum((t - mean_t) * (r - mean_r) for t, r in self._samples) / sxx
        residual = sum((r - mean_r - slope * (t - mean_t)) ** 2 for t, r in self._samples)
        # A rate counted over an interval is at least as noisy as a Poisson count; a few
        # samples of a low rate can line up by chance and understate their own spread.
        interval = (self._samples[-1][0] - self._samples[0][0]) / (n - 1)
        counting = mean_r / interval if interval > 0 else 0.0
        stderr = math.sqrt(max(residual / (n - 2), counting) / sxx)
        return max(0.0, slope - self.trend_significance * stderr)

    def forecast(self, horizon_s: float) -> float:
        """The arrival rate expected ``horizon_s`` from now; never below the current one,
        since a forecast may only add capacity."""
        rate = self.rate or 0.0
        return rate + self.trend() * horizon_s


def erlang_c_slots(load: float, service_s: float, wait_s: float, quantile: float,
                   limit: int) -> int:
    """The fewest slots ``c`` for which an M/M/c queue offered ``load`` Erlangs keeps
    ``P(wait > wait_s) <= 1 - quantile`` (Erlang C), at most ``limit``.

    Little's Law alone (``c = load``) makes the average fit and the tail wait without
    bound; this adds the headroom the tail needs, which shrinks as the pool grows.
    """
    if load <= 0:
        return 0
    allowed = 1 - quantile
    blocking = 1.0  # Erlang B of zero servers, raised one server at a time
    servers = 0
    while servers < limit:
        servers += 1
        blocking = load * blocking / (servers + load * blocking)
        if servers <= load:
            continue
        waits = servers * blocking / (servers - load * (1 - blocking))
        if waits * math.exp(-(servers - load) * wait_s / service_s) <= allowed:
            return servers
    return limit
