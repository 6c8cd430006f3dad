"""Statistics of a multi-seed study (`examples/study.py`): per-arm mean and sample standard deviation over seeds, and
the paired difference of an arm against the baseline with a Student t confidence interval.

Runs of two arms with the same seed share the initialisation, the held-out split and the data order, so an arm is
compared with the baseline seed by seed: d_s = arm_s - baseline_s over the seeds both have, and

    mean(d) +/- t_{(1 + confidence) / 2, n - 1} * std(d) / sqrt(n)      (std with n - 1 in the denominator).

The t quantile comes from `scipy.stats.t.ppf` when scipy is installed, otherwise from `student_t_quantile`: the
exact Student t CDF for an integer number of degrees of freedom (Abramowitz & Stegun 26.7.3-4, a finite sum) inverted
by bisection. Everything here is pure Python on plain numbers.

The study's arms (`STUDY_ARMS`) live here too, so every script that compares against "the baseline" means the
paper's: the DeiT recipe itself (Mixup/CutMix on, CLS loss) with only the diversity terms and the patch-wise loss
removed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from .configuration import DiversityConfig

DIVERSITY_COEFFICIENTS = (
    "patch_cosine_coef",
    "patch_contrastive_coef",
    "attention_cosine_coef",
    "weight_condition_coef",
)


@dataclass(frozen=True)
class StudyArm:
    """One arm of a study: which diversity coefficients are on (at their released values) and the training loss.

    Mixup/CutMix stay on in every arm: they are part of the DeiT recipe the paper's baseline trains with.
    """

    description: str
    enabled: tuple[str, ...]
    patch_mixing_loss: bool

    @property
    def flags(self) -> list[str]:
        """`examples/run_diverse.py` flags: every coefficient explicit (released value if enabled, else 0), and
        `--no_patch_mixing_loss` for the CLS-token loss."""
        released = {f.name: f.default for f in fields(DiversityConfig)}
        flags = [
            flag
            for name in DIVERSITY_COEFFICIENTS
            for flag in (f"--{name}", str(released[name] if name in self.enabled else 0))
        ]
        return flags + ([] if self.patch_mixing_loss else ["--no_patch_mixing_loss"])


STUDY_ARMS = {
    "baseline": StudyArm("DeiT recipe: Mixup/CutMix, CLS loss, no diversity term", (), False),
    "diverse": StudyArm("Diverse-ViT, released settings: all terms + patch-wise loss", DIVERSITY_COEFFICIENTS, True),
    "patch": StudyArm("patch cosine + contrastive + patch-wise loss", DIVERSITY_COEFFICIENTS[:2], True),
    "attention": StudyArm("attention term alone, CLS loss", DIVERSITY_COEFFICIENTS[2:3], False),
    "weight": StudyArm("weight term alone, CLS loss", DIVERSITY_COEFFICIENTS[3:], False),
}


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1 denominator) of `values`.

    Args:
        values: the numbers (e.g. one arm's accuracy per seed).

    Returns:
        `(mean, std)`; the mean is None for no value, the std None for fewer than two.
    """
    n = len(values)
    if n == 0:
        return None, None
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def student_t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with an integer `df` >= 1, in closed form (Abramowitz & Stegun 26.7.3-4).

    Args:
        x: the point.
        df: degrees of freedom, an integer >= 1.

    Returns:
        The cumulative probability.
    """
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an integer >= 1, got {df!r}.")
    if x < 0:
        return 1.0 - student_t_cdf(-x, df)
    theta = math.atan(x / math.sqrt(df))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:  # A = 2/pi (theta + sin (cos + 2/3 cos^3 + ... + (2.4...(df-3))/(1.3...(df-2)) cos^(df-2)))
        term, total = math.cos(theta), 0.0
        for k in range((df - 1) // 2):
            total += term
            term *= cos2 * (2 * k + 2) / (2 * k + 3)
        two_sided = 2.0 / math.pi * (theta + sin * total)
    else:  # A = sin (1 + 1/2 cos^2 + ... + (1.3...(df-3))/(2.4...(df-2)) cos^(df-2))
        term, total = 1.0, 0.0
        for k in range(df // 2):
            total += term
            term *= cos2 * (2 * k + 1) / (2 * k + 2)
        two_sided = sin * total
    return 0.5 + 0.5 * two_sided


def student_t_quantile(p: float, df: int) -> float:
    """The `p` quantile of Student's t with an integer `df`: `student_t_cdf` inverted by bisection (to the last bit).

    Args:
        p: probability in (0, 1).
        df: degrees of freedom, an integer >= 1.

    Returns:
        x with P(T <= x) = p.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p!r}.")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if student_t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def t_quantile_method() -> str:
    """Which implementation `t_quantile` uses, in words (for reports)."""
    try:
        import scipy
        import scipy.stats
    except ImportError:
        return "exact Student t CDF (Abramowitz & Stegun 26.7.3-4) inverted by bisection (scipy is not installed)"
    return f"scipy.stats.t.ppf (scipy {scipy.__version__})"


def t_quantile(p: float, df: int) -> float:
    """The `p` quantile of Student's t with `df` degrees of freedom: scipy when installed, else `student_t_quantile`.

    Args:
        p: probability in (0, 1).
        df: degrees of freedom, an integer >= 1.

    Returns:
        x with P(T <= x) = p.
    """
    try:
        from scipy.stats import t
    except ImportError:
        return student_t_quantile(p, df)
    return float(t.ppf(p, df))


def t_two_sided_p_value(statistic: float, df: int) -> float:
    """Two-sided p-value 2 P(T >= |statistic|): scipy when installed, else `student_t_cdf`.

    Args:
        statistic: the t statistic.
        df: degrees of freedom, an integer >= 1.

    Returns:
        The p-value in [0, 1].
    """
    try:
        from scipy.stats import t
    except ImportError:
        return min(1.0, 2.0 * (1.0 - student_t_cdf(abs(statistic), df)))
    return float(2.0 * t.sf(abs(statistic), df))


@dataclass(frozen=True)
class PairedDifference:
    """arm - baseline, seed by seed, with its `confidence` Student t interval (None where undefined: n < 2, or the
    t statistic and p-value when every difference is the same)."""

    seeds: list[int]
    differences: list[float]
    n: int
    mean: float | None
    std: float | None
    standard_error: float | None
    confidence: float
    ci_low: float | None
    ci_high: float | None
    t_statistic: float | None
    p_value: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_difference(
    treatment: Mapping[int, float | None], control: Mapping[int, float | None], confidence: float = 0.95
) -> PairedDifference:
    """The paired difference treatment - control over the seeds both have (a None value drops its seed).

    Args:
        treatment: seed -> value of the arm.
        control: seed -> value of the baseline.
        confidence: the interval's coverage, in (0, 1).

    Returns:
        A `PairedDifference` with mean +/- t_{(1 + confidence) / 2, n - 1} std / sqrt(n).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}.")
    seeds = sorted(s for s in treatment if s in control and treatment[s] is not None and control[s] is not None)
    differences = [treatment[s] - control[s] for s in seeds]
    n = len(differences)
    mean, std = mean_std(differences)
    se = low = high = statistic = p_value = None
    if std is not None:
        se = std / math.sqrt(n)
        half = t_quantile((1.0 + confidence) / 2.0, n - 1) * se
        low, high = mean - half, mean + half
        if se > 0:
            statistic = mean / se
            p_value = t_two_sided_p_value(statistic, n - 1)
    return PairedDifference(seeds, differences, n, mean, std, se, confidence, low, high, statistic, p_value)


def summarize(values: Iterable[float | None]) -> dict[str, Any]:
    """n, mean, sample std, min and max of the values that are not None.

    Args:
        values: the numbers; None (undefined) entries are left out.

    Returns:
        `{"n", "mean", "std", "min", "max"}` (None where undefined).
    """
    kept = [v for v in values if v is not None]
    mean, std = mean_std(kept)
    return {"n": len(kept), "mean": mean, "std": std, "min": min(kept, default=None), "max": max(kept, default=None)}


def run_values(run: Mapping[str, Any]) -> dict[str, float | None]:
    """The numbers of one study run: its `metrics` (top1, top5, eval_loss, wall_time_s) and `redundancy` summary."""
    return {**run["metrics"], **(run.get("redundancy") or {})}


def study_statistics(
    runs: Sequence[Mapping[str, Any]], baseline: str = "baseline", confidence: float = 0.95
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per setting and arm: the seeds, a `summarize` of every value over seeds, and (arms other than `baseline`, when
    the setting has it) the `paired_difference` of every value against the baseline.

    Args:
        runs: study runs, each with "setting", "arm", "seed" and the values `run_values` reads.
        baseline: the arm the others are compared with.
        confidence: coverage of the paired intervals.

    Returns:
        `{setting: {arm: {"seeds": [...], "summary": {key: summarize}, "paired": {key: PairedDifference dict} | None}}}`
    """
    grouped: dict[str, dict[str, dict[int, dict[str, float | None]]]] = {}
    for run in runs:
        grouped.setdefault(run["setting"], {}).setdefault(run["arm"], {})[run["seed"]] = run_values(run)
    statistics: dict[str, dict[str, dict[str, Any]]] = {}
    for setting, arms in grouped.items():
        statistics[setting] = {}
        for arm, by_seed in arms.items():
            keys = list(dict.fromkeys(key for values in by_seed.values() for key in values))
            entry: dict[str, Any] = {
                "seeds": sorted(by_seed),
                "summary": {key: summarize(values.get(key) for values in by_seed.values()) for key in keys},
                "paired": None,
            }
            if arm != baseline and baseline in arms:
                control = arms[baseline]
                entry["paired"] = {
                    key: paired_difference(
                        {s: v.get(key) for s, v in by_seed.items()},
                        {s: v.get(key) for s, v in control.items()},
                        confidence,
                    ).to_dict()
                    for key in keys
                }
            statistics[setting][arm] = entry
    return statistics


__all__ = [
    "DIVERSITY_COEFFICIENTS",
    "STUDY_ARMS",
    "PairedDifference",
    "StudyArm",
    "mean_std",
    "paired_difference",
    "run_values",
    "student_t_cdf",
    "student_t_quantile",
    "study_statistics",
    "summarize",
    "t_quantile",
    "t_quantile_method",
    "t_two_sided_p_value",
]
