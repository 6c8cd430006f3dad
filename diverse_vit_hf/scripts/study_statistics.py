"""Statistics of a multi-seed study (`examples/study.py`): per-arm mean and sample standard deviation over seeds, and
the paired difference of an arm against the baseline with a Student t confidence interval.

Runs of two arms with the same seed share the initialisation, the held-out split and the data order, so an arm is
compared with the baseline seed by seed: d_s = arm_s - baseline_s over the seeds both have, and

    mean(d) +/- t_{(1 + confidence) / 2, n - 1} * std(d) / sqrt(n)      (std with n - 1 in the denominator).

The t quantile comes from `scipy.stats.t.ppf` when scipy is installed, otherwise from `student_t_quantile`: the
exact Student t CDF for an integer number of degrees of freedom (Abramowitz & Stegun 26.7.3-4, a finite sum) inverted
by bisection. Everything here is pure Python on plain numbers.

Accuracy against training time (runs that evaluated during training): `curve_from_log_history` reads a run's curve
(held-out top-1 per evaluation epoch) from its `trainer_state.json`; `mean_curve` averages curves per epoch (mean,
sample std, t interval); `best_point` and `first_epoch_reaching` read the best top-1 and the first epoch at a target
(the baseline's mean final top-1) off one curve, `reach_summary` counts the runs that reach it; `convergence_check`
states whether a curve has flattened (gain over its last `CONVERGENCE_WINDOW` of epochs below
`CONVERGENCE_TOLERANCE`); `curve_statistics` does all of it per setting and arm.

The study's arms (`STUDY_ARMS`) live here too, so every script that compares against "the baseline" means the
paper's: the DeiT recipe itself (Mixup/CutMix on, CLS loss) with only the diversity terms and the patch-wise loss
removed.
"""

from __future__ import annotations

import math
import statistics as stdlib_statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..losses.configuration import DIVERSITY_COEFFICIENTS, DiversityConfig


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
    """The numbers of one study run: its `metrics` (top1, top5, eval_loss, wall_time_s), and `redundancy` summary and,
    when it has an accuracy curve, `best_top1` and `best_epoch` (`best_point`)."""
    values = {**run["metrics"], **(run.get("redundancy") or {})}
    best = best_point(run.get("curve") or [])
    if best is not None:
        values.update(best_top1=best["top1"], best_epoch=best["epoch"])
    return values


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


# ---- Accuracy against training time --------------------------------------------------------------------------------

# The baseline counts as converged when its mean curve gains less than CONVERGENCE_TOLERANCE (0.5 points of top-1)
# from the start of its last CONVERGENCE_WINDOW (25%) of epochs to its last evaluation (`convergence_check`).
CONVERGENCE_WINDOW = 0.25
CONVERGENCE_TOLERANCE = 0.005
# An accuracy equal to the target counts as reaching it, whatever the rounding of the target (a mean over seeds).
REACH_TOLERANCE = 1e-9


def curve_from_log_history(
    log_history: Iterable[Mapping[str, Any]], metric: str = "eval_top1", digits: int = 6
) -> list[dict[str, float]]:
    """The accuracy curve of one run, from its `trainer_state.json` `log_history`.

    Every entry with `metric` and an `epoch` is one evaluation. An epoch evaluated twice (the Trainer's evaluation at
    the end of training, then `run_diverse.py`'s final evaluation of the same model) keeps its last entry, so the
    curve ends with the run's final top-1.

    Args:
        log_history: the Trainer's log entries (training logs without `metric` are skipped).
        metric: the accuracy key of the evaluation entries.
        digits: epochs are rounded to this many decimals (so curves of different runs share their epochs).

    Returns:
        `[{"epoch": e, "top1": accuracy}, ...]` sorted by epoch; empty when the run never evaluated.
    """
    by_epoch: dict[float, float] = {}
    for entry in log_history:
        if entry.get(metric) is not None and entry.get("epoch") is not None:
            by_epoch[round(float(entry["epoch"]), digits)] = float(entry[metric])
    return [{"epoch": epoch, "top1": by_epoch[epoch]} for epoch in sorted(by_epoch)]


def best_point(curve: Sequence[Mapping[str, float]]) -> dict[str, float] | None:
    """The highest top-1 of a curve and the first epoch at which it was measured.

    Args:
        curve: `{"epoch", "top1"}` points.

    Returns:
        `{"epoch", "top1"}` (ties: the earliest epoch), or None for an empty curve.
    """
    if not curve:
        return None
    best = max(point["top1"] for point in curve)
    return {"epoch": min(point["epoch"] for point in curve if point["top1"] == best), "top1": best}


def first_epoch_reaching(
    curve: Sequence[Mapping[str, float]], target: float, tolerance: float = REACH_TOLERANCE
) -> float | None:
    """The first evaluation epoch at which a curve's top-1 is at least `target`.

    Args:
        curve: `{"epoch", "top1"}` points.
        target: the accuracy to reach (e.g. the baseline's mean final top-1).
        tolerance: a top-1 within this of the target counts as reaching it (a tie is reached).

    Returns:
        The epoch, or None if the curve never reaches the target.
    """
    for point in sorted(curve, key=lambda point: point["epoch"]):
        if point["top1"] >= target - tolerance:
            return point["epoch"]
    return None


def reach_summary(epochs: Iterable[float | None]) -> dict[str, Any]:
    """How many runs reach a target and when.

    Args:
        epochs: per run, the `first_epoch_reaching` epoch, None for a run that never reaches the target.

    Returns:
        `{"n": runs, "reached": runs that reach it, "median_epoch": median epoch of those that reach it}` (None when
        none does; with an even number of them, the mean of the two middle epochs).
    """
    values = list(epochs)
    reached = [epoch for epoch in values if epoch is not None]
    median = stdlib_statistics.median(reached) if reached else None
    return {"n": len(values), "reached": len(reached), "median_epoch": median}


def mean_curve(curves: Iterable[Sequence[Mapping[str, float]]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """The mean curve of several runs, per evaluation epoch over the runs evaluated at that epoch.

    Args:
        curves: one `{"epoch", "top1"}` curve per run.
        confidence: coverage of the interval, in (0, 1).

    Returns:
        `[{"epoch", "n", "mean", "std", "ci_low", "ci_high"}, ...]` sorted by epoch: std is the sample standard
        deviation (None for n < 2), the interval mean +/- t_{(1 + confidence) / 2, n - 1} std / sqrt(n) (None for
        n < 2).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}.")
    by_epoch: dict[float, list[float]] = {}
    for curve in curves:
        for point in curve:
            by_epoch.setdefault(point["epoch"], []).append(point["top1"])
    points = []
    for epoch in sorted(by_epoch):
        values = by_epoch[epoch]
        mean, std = mean_std(values)
        low = high = None
        if std is not None:
            half = t_quantile((1.0 + confidence) / 2.0, len(values) - 1) * std / math.sqrt(len(values))
            low, high = mean - half, mean + half
        points.append({"epoch": epoch, "n": len(values), "mean": mean, "std": std, "ci_low": low, "ci_high": high})
    return points


def convergence_check(
    curve: Sequence[Mapping[str, Any]],
    key: str = "mean",
    window: float = CONVERGENCE_WINDOW,
    tolerance: float = CONVERGENCE_TOLERANCE,
) -> dict[str, Any]:
    """Has a curve flattened? It has when it gains less than `tolerance` over its last `window` of epochs.

    With E the last evaluated epoch, the stretch starts at the latest evaluation at or before epoch (1 - window) E
    (so it spans at least window E epochs), and gain = value at E - value at that start.

    Args:
        curve: points with "epoch" and `key` (a `mean_curve`, or a single run's curve with key="top1").
        key: the value read off each point.
        window: the fraction of the epochs at the end, in (0, 1).
        tolerance: the largest gain (accuracy, 0.005 = 0.5 points) that still counts as flat.

    Returns:
        `{"window", "tolerance", "start_epoch", "end_epoch", "start", "end", "gain", "holds"}`; `holds` is True or
        False, and None (with start and gain None) when the curve has no evaluation before its last stretch.
    """
    if not 0.0 < window < 1.0:
        raise ValueError(f"window must lie in (0, 1), got {window!r}.")
    points = sorted((p for p in curve if p.get(key) is not None), key=lambda p: p["epoch"])
    result: dict[str, Any] = {"window": window, "tolerance": tolerance, "start_epoch": None, "end_epoch": None,
                              "start": None, "end": None, "gain": None, "holds": None}  # fmt: skip
    if not points:
        return result
    end = points[-1]
    result.update(end_epoch=end["epoch"], end=end[key])
    cut = (1.0 - window) * end["epoch"]
    before = [p for p in points[:-1] if p["epoch"] <= cut * (1 + 1e-12)]
    if not before:
        return result
    start = before[-1]
    gain = end[key] - start[key]
    return {**result, "start_epoch": start["epoch"], "start": start[key], "gain": gain, "holds": gain < tolerance}


def curve_convergence(
    curves: Mapping[int, Sequence[Mapping[str, float]]],
    confidence: float = 0.95,
    window: float = CONVERGENCE_WINDOW,
    tolerance: float = CONVERGENCE_TOLERANCE,
) -> dict[str, Any]:
    """`convergence_check` of the mean of several runs' curves, plus each run's own gain over the same stretch.

    Args:
        curves: seed -> `{"epoch", "top1"}` curve.
        confidence: coverage of the mean curve's and the gain's t intervals.
        window, tolerance: the criterion (`convergence_check`).

    Returns:
        The `convergence_check` dict of the `mean_curve`, with "seed_gain": the `paired_difference` (as a dict) of the
        top-1 at the end epoch against the top-1 at the start epoch over the seeds evaluated at both (None when the
        check is undefined).
    """
    result = convergence_check(mean_curve(curves.values(), confidence), "mean", window, tolerance)
    result["seed_gain"] = None
    if result["start_epoch"] is not None:
        end, start = ({seed: top1_at(curve, result[key]) for seed, curve in curves.items()}
                      for key in ("end_epoch", "start_epoch"))  # fmt: skip
        result["seed_gain"] = paired_difference(end, start, confidence).to_dict()
    return result


def top1_at(curve: Sequence[Mapping[str, float]], epoch: float) -> float | None:
    """The top-1 a curve measured at `epoch`, None if it was not evaluated then."""
    return next((point["top1"] for point in curve if point["epoch"] == epoch), None)


def curve_statistics(
    runs: Sequence[Mapping[str, Any]],
    baseline: str = "baseline",
    confidence: float = 0.95,
    window: float = CONVERGENCE_WINDOW,
    tolerance: float = CONVERGENCE_TOLERANCE,
) -> dict[str, dict[str, Any]]:
    """Per setting (those with at least one run that has a `curve`): the baseline's mean final top-1 (the target),
    the baseline's `curve_convergence` (the criterion on its mean curve, and the per-seed gain over the same
    stretch), and per arm the `mean_curve`, each run's `first_epoch_reaching` the target and their
    `reach_summary`.

    Args:
        runs: study runs, each with "setting", "arm", "seed", `metrics["top1"]` (the final top-1) and, when it
            evaluated during training, "curve" (`{"epoch", "top1"}` points).
        baseline: the arm whose mean final top-1 is the target and whose convergence is checked.
        confidence: coverage of the mean curves' and the gain's t intervals.
        window, tolerance: the convergence criterion (`convergence_check`).

    Returns:
        `{setting: {"baseline_final_mean", "convergence", "arms": {arm: {"seeds", "mean_curve",
        "epochs_to_baseline_final": [{"seed", "epoch"}], "reach"}}}}`; the target and the convergence are None
        without baseline runs (baseline curves, for the convergence).
    """
    grouped: dict[str, dict[str, dict[int, Mapping[str, Any]]]] = {}
    for run in runs:
        grouped.setdefault(run["setting"], {}).setdefault(run["arm"], {})[run["seed"]] = run
    result: dict[str, dict[str, Any]] = {}
    for setting, arms in grouped.items():
        curves = {arm: {s: r["curve"] for s, r in by_seed.items() if r.get("curve")} for arm, by_seed in arms.items()}
        if not any(curves.values()):
            continue
        finals = [r["metrics"]["top1"] for r in arms.get(baseline, {}).values() if r["metrics"]["top1"] is not None]
        target = mean_std(finals)[0]
        convergence = None
        if curves.get(baseline):
            convergence = curve_convergence(curves[baseline], confidence, window, tolerance)
        entry: dict[str, Any] = {"baseline_final_mean": target, "convergence": convergence, "arms": {}}
        for arm, by_seed in curves.items():
            if not by_seed:
                continue
            epochs = [
                {"seed": s, "epoch": None if target is None else first_epoch_reaching(by_seed[s], target)}
                for s in sorted(by_seed)
            ]
            entry["arms"][arm] = {
                "seeds": sorted(by_seed),
                "mean_curve": mean_curve(by_seed.values(), confidence),
                "epochs_to_baseline_final": epochs,
                "reach": None if target is None else reach_summary(e["epoch"] for e in epochs),
            }
        result[setting] = entry
    return result


# ---- The same study at two budgets --------------------------------------------------------------------------------


def budget_comparison(
    runs: Sequence[Mapping[str, Any]],
    reference_finals: Mapping[str, Mapping[str, Mapping[int, float]]],
    baseline: str = "baseline",
    confidence: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """The final top-1 of a study's runs against the same runs (setting, arm, seed) trained at another budget, as a
    budget-convergence check: does an arm's final top-1, and its gap to the baseline, move when the budget grows?

    Args:
        runs: this study's runs (each with "setting", "arm", "seed" and `metrics["top1"]`).
        reference_finals: `{setting: {arm: {seed: final top-1}}}` of the runs at the other budget.
        baseline: the arm the gaps are taken to.
        confidence: coverage of the paired intervals.

    Returns:
        `{setting: {arm: {"seeds", "reference": summarize, "this": summarize, "change": PairedDifference dict,
        "gap_change": PairedDifference dict | None}}}` for the settings and arms both have: `change` is this study's
        final top-1 minus the reference's, per seed; `gap_change` the change of (arm - baseline), per seed.
    """
    this: dict[str, dict[str, dict[int, float]]] = {}
    for run in runs:
        this.setdefault(run["setting"], {}).setdefault(run["arm"], {})[run["seed"]] = run["metrics"]["top1"]
    result: dict[str, dict[str, Any]] = {}
    for setting, arms in this.items():
        reference = reference_finals.get(setting, {})
        entry: dict[str, Any] = {}
        for arm, by_seed in arms.items():
            earlier = reference.get(arm, {})
            seeds = sorted(s for s in by_seed if s in earlier)
            if not seeds:
                continue
            gap_change = None
            if arm != baseline and baseline in arms and baseline in reference:
                gap_now = {s: by_seed[s] - arms[baseline][s] for s in seeds if s in arms[baseline]}
                gap_then = {s: earlier[s] - reference[baseline][s] for s in seeds if s in reference[baseline]}
                gap_change = paired_difference(gap_now, gap_then, confidence).to_dict()
            entry[arm] = {
                "seeds": seeds,
                "reference": summarize(earlier[s] for s in seeds),
                "this": summarize(by_seed[s] for s in seeds),
                "change": paired_difference({s: by_seed[s] for s in seeds}, earlier, confidence).to_dict(),
                "gap_change": gap_change,
            }
        if entry:
            result[setting] = entry
    return result


__all__ = [
    "CONVERGENCE_TOLERANCE",
    "CONVERGENCE_WINDOW",
    "DIVERSITY_COEFFICIENTS",
    "REACH_TOLERANCE",
    "STUDY_ARMS",
    "PairedDifference",
    "StudyArm",
    "best_point",
    "budget_comparison",
    "convergence_check",
    "curve_convergence",
    "curve_from_log_history",
    "curve_statistics",
    "first_epoch_reaching",
    "mean_curve",
    "mean_std",
    "paired_difference",
    "reach_summary",
    "run_values",
    "student_t_cdf",
    "student_t_quantile",
    "study_statistics",
    "summarize",
    "top1_at",
    "t_quantile",
    "t_quantile_method",
    "t_two_sided_p_value",
]
