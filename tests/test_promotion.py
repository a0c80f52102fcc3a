from pathlib import Path

import pytest

from tasks.records import EvalReport, ModelScore
from tasks.register import decide_promotion, flatten


def report(base: float, candidate: float, champion: float | None = None) -> EvalReport:
    s = lambda a: ModelScore(accuracy=a, n_examples=100, n_unparsed=0)  # noqa: E731
    return EvalReport(n_examples=100, base=s(base), candidate=s(candidate),
                      champion=None if champion is None else s(champion),
                      champion_version=None if champion is None else "1", predictions_path=Path("p.jsonl"))


@pytest.mark.parametrize("r,min_improvement,promoted,baseline", [
    (report(0.1, 0.8), 0.0, True, "base"),            # first model: must beat the base
    (report(0.5, 0.5), 0.0, False, "base"),           # first model no better than base
    (report(0.1, 0.9, 0.8), 0.0, True, "champion"),   # better than the champion
    (report(0.1, 0.8, 0.8), 0.0, False, "champion"),  # a tie keeps the champion
    (report(0.1, 0.7, 0.8), 0.0, False, "champion"),  # worse
    (report(0.1, 0.81, 0.8), 0.02, False, "champion"),  # better, but by less than required
    (report(0.1, 0.83, 0.8), 0.02, True, "champion"),
])
def test_promotion_only_when_strictly_better_by_the_required_margin(r, min_improvement, promoted, baseline):
    decision = decide_promotion(r, min_improvement)
    assert decision.promoted is promoted
    assert decision.baseline == baseline
    assert baseline in decision.reason and ("does not beat" in decision.reason) is (not promoted)


def test_flatten_makes_dotted_params():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": "1", "a.c.d": "[1, 2]", "e": "None"}
