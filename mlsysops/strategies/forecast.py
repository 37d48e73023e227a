"""A short-horizon forecast of a request rate from its recent history.

A least-squares line through the samples of the last ``window`` seconds, read
``horizon`` seconds after the newest sample, plus ``margin`` standard deviations of the
residuals (an upper estimate: under-provisioning costs more than a spare replica). It
follows trends (ramps, diurnal slopes); it cannot foresee a jump that nothing announced.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from mlsysops.strategies.options import ForecastOptions


def forecast(history: Iterable[tuple[float, float]], options: ForecastOptions) -> float | None:
    """The forecast rate, or None with fewer than ``min_points`` samples in the window."""
    points = sorted((float(t), float(v)) for t, v in history
                    if math.isfinite(t) and math.isfinite(v))
    if not points:
        return None
    newest = points[-1][0]
    points = [(t, v) for t, v in points if t >= newest - options.window]
    if len(points) < options.min_points:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in points)
    if var_t <= 0:
        return max(0.0, mean_v)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / var_t
    intercept = mean_v - slope * mean_t
    residual = math.sqrt(sum((v - (intercept + slope * t)) ** 2 for t, v in points) / n)
    ahead = intercept + slope * (newest + options.horizon)
    return max(0.0, ahead + options.margin * residual)
