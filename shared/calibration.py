"""Does a confidence rank cases by their true quality? Spearman correlation and a reliability table.

Labeling jobs order cases for expert review by the assistant's confidence, so what matters is the
order, not the scale: Spearman's rank correlation between confidence and true Dice, and a reliability
table (confidence bins against the mean true Dice in each) that shows where the confidence can be trusted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def spearman(confidence: Sequence[float], quality: Sequence[float]) -> float:
    """Spearman's rho over the pairs where both are finite; NaN with fewer than 3 pairs or a constant side."""
    x = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(quality, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"confidence and quality differ in length: {x.shape} vs {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def reliability_table(
    confidence: Sequence[float], quality: Sequence[float], bins: int = 4
) -> list[dict[str, float]]:
    """Equal-count confidence bins (quantiles, so every bin has cases): per bin its confidence range,
    count, mean confidence and mean quality. Rows from the least to the most confident."""
    x = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(quality, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) == 0:
        return []
    order = np.argsort(x, kind="stable")
    rows = []
    for part in np.array_split(order, min(bins, len(x))):
        rows.append(
            {
                "conf_lo": float(x[part].min()),
                "conf_hi": float(x[part].max()),
                "count": int(len(part)),
                "mean_confidence": float(x[part].mean()),
                "mean_quality": float(y[part].mean()),
            }
        )
    return rows


def reliability_markdown(rows: list[dict[str, float]], quality_name: str = "true Dice") -> str:
    lines = [
        f"| confidence bin | cases | mean confidence | mean {quality_name} |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['conf_lo']:.3f}-{r['conf_hi']:.3f} | {r['count']} | {r['mean_confidence']:.3f} | {r['mean_quality']:.2f} |"
        )
    return "\n".join(lines)
