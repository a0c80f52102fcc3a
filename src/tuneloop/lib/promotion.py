"""Promotion: whether a candidate replaces the champion, decided from the evaluation alone.

A pure function of the scores and the configured rule (no MLflow, no Prefect), so the rule reads in one
place and is tested on made-up scores; ``tasks.register`` records and applies the decision it returns.
"""

from __future__ import annotations

from tuneloop.core.config import EvaluateConfig, RegisterConfig
from tuneloop.core.records import EvalReport, PromotionDecision, TuneloopError

COMPARED = ("accuracy", "macro_f1", "exact_match", "rouge_l", "bleu", "judge")  # reported when scored


def decide_promotion(report: EvalReport, evaluate: EvaluateConfig, register: RegisterConfig,
                     has_champion: bool) -> PromotionDecision:
    """Strictly better than the champion (the base model, before there is one) on ``evaluate.primary_metric``
    by at least ``register.min_improvement`` (a tie never replaces the champion, unless ``register.promote_when``
    is ``at_least_as_good``, as in a migration), and no ``evaluate.guards`` metric down by more than its tolerance."""
    if has_champion and report.champion is None:
        raise TuneloopError("register: there is a champion but the evaluation did not score it, so the candidate "
                            "cannot be compared with it: evaluate again with the champion")
    primary, guards = evaluate.primary_metric, evaluate.guards
    baseline, reference = ("champion", report.champion) if has_champion else ("base", report.base)
    names = sorted({primary, *guards, *(m for m in COMPARED if getattr(report.candidate, m) is not None)})
    deltas = {m: round(report.candidate.metric(m) - reference.metric(m), 4) for m in names}
    delta = deltas[primary]
    failures = [f"{m} {deltas[m]:+.3f} (allowed -{tol:.3f})" for m, tol in sorted(guards.items()) if deltas[m] < -tol]
    floors = []  # not guards against the reference: floors any candidate must clear (register.beat_majority)
    if register.beat_majority and report.majority is not None:
        floor = report.majority.metric(primary)
        if report.candidate.metric(primary) <= floor:
            floors.append(f"{primary} {report.candidate.metric(primary):.3f} does not beat the majority-class "
                          f"baseline (always {report.majority_label!r}: {floor:.3f})")
    if register.beat_prompted and report.prompted is not None:
        floor = report.prompted.metric(primary)
        if report.candidate.metric(primary) <= floor:
            floors.append(f"{primary} {report.candidate.metric(primary):.3f} does not beat the prompted base model "
                          f"({report.shots.removesuffix('-shot')} solved examples in its prompt: {floor:.3f})")
    if register.beat_majority and report.collapse:
        floors.append(f"collapsed onto one label: {report.collapse}")
    tie_wins = register.promote_when == "at_least_as_good"
    promoted = (delta >= 0 if tie_wins else delta > 0) and delta >= register.min_improvement and not failures \
        and not floors
    verdict = ("matches or beats" if tie_wins else "beats") if promoted else \
        ("does not match" if tie_wins else "does not beat")
    required = f">= {register.min_improvement:.3f}" if tie_wins else f"> 0 and >= {register.min_improvement:.3f}"
    reason = (f"candidate {primary} {report.candidate.metric(primary):.3f} {verdict} {baseline}"
              f" {reference.metric(primary):.3f} (delta {delta:+.3f}, required {required})")
    if failures:
        reason += "; guard regressed: " + ", ".join(failures)
    if floors:
        reason += "; refused: " + "; ".join(floors)
    return PromotionDecision(promoted=promoted, reason=reason, baseline=baseline, delta=delta,
                             primary_metric=primary, deltas=deltas, guard_failures=failures + floors)
