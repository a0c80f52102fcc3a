"""Drift statistics and the scenario generator: pure functions, no training."""

import json
import sys
from collections import Counter

from conftest import ROOT
from tuneloop.core.records import ChatExample
from tuneloop.tasks.drift import input_drift, length_psi, new_vocabulary_share, psi

sys.path.insert(0, str(ROOT / "data"))


def example(text: str, label: str, i: int = 0) -> ChatExample:
    return ChatExample(messages=[{"role": "user", "content": text}, {"role": "assistant", "content": f"queue: {label}"}],
                       label=label, record_id=str(i), source="t", line=i, content_hash=f"{i:064x}")


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_new_category():
    same = Counter({"a": 50, "b": 50})
    assert psi(same, Counter({"a": 500, "b": 500})) == 0.0
    assert 0 < psi(same, Counter({"a": 55, "b": 45})) < 0.1  # sampling noise stays under the usual 0.2
    assert psi(same, Counter({"a": 35, "b": 35, "hub": 30})) > 0.2  # a new label appears


def test_length_psi_and_new_vocabulary_see_longer_tickets_and_new_words():
    ref = [20 + i % 40 for i in range(400)]
    assert length_psi(ref, ref[::2]) < 0.05
    assert length_psi(ref, [x * 3 for x in ref]) > 0.2
    assert new_vocabulary_share(["sync folder invoice"], ["sync invoice"]) == 0.0
    assert new_vocabulary_share(["sync folder invoice"], ["hub firmware sync pairing"]) == 0.75


def test_input_drift_compares_user_text_and_labels():
    ref = [example(f"my files do not sync {i}", "sync", i) for i in range(50)]
    recent = [example("the hub firmware pairing fails", "hub", i) for i in range(50)]
    shifts = input_drift(ref, recent)
    assert shifts["psi_label"] > 0.2 and shifts["new_vocabulary_share"] > 0.5
    assert input_drift(ref, ref)["psi_label"] == 0.0



def test_a_change_the_champion_has_learned_is_no_longer_drift():
    """Distributions compare with the champion's newest training examples; vocabulary with all of them."""
    before = [example(f"my files do not sync {i}", "sync", i) for i in range(300)]
    after = [example(f"{'the hub firmware fails' if i % 3 else 'my files do not sync'} {i}", "hub" if i % 3 else "sync",
                     300 + i) for i in range(60)]
    recent = [example(f"{'the hub pairing fails' if i % 3 else 'sync is stuck'} {i}", "hub" if i % 3 else "sync", i)
              for i in range(60)]
    trained = before + after  # the champion retrained after the launch: old examples still outnumber new ones
    assert input_drift(trained, recent)["psi_label"] > 0.2  # against everything: drift forever
    learned = input_drift(trained, recent, window=60)
    assert learned["psi_label"] < 0.05  # against what it learned last: none
    assert learned["new_vocabulary_share"] == input_drift(trained, recent)["new_vocabulary_share"] > 0
    assert input_drift(before, recent, window=60)["psi_label"] > 0.2  # before the retrain: drift


def test_the_scenario_is_deterministic_and_drifts_at_the_week_it_says(tmp_path):
    from generate_scenario import generate

    a = generate(tmp_path / "a", seed=3, weeks=4, drift_at=3, per_week=300, eval_per_week=50, first_week=300)
    b = generate(tmp_path / "b", seed=3, weeks=4, drift_at=3, per_week=300, eval_per_week=50, first_week=300)
    assert all(x["train"].read_bytes() == y["train"].read_bytes() for x, y in zip(a, b, strict=True))

    def rows(week):
        return [json.loads(line) for line in a[week - 1]["train"].read_text().splitlines()]

    before, after = rows(2), rows(3)
    assert not any(r["queue"] == "hub" for r in before) and not any(r["plan"] == "Scale" for r in before)
    hub_share = sum(r["queue"] == "hub" for r in after) / len(after)
    assert 0.2 < hub_share < 0.4 and any(r["plan"] == "Scale" for r in after)
    downgrades = [r for r in after if "downgrade to the free plan" in r["body"]]
    assert downgrades and {r["queue"] for r in downgrades} == {"billing"}  # was cancellation before the launch
    ids = [r["ticket_id"] for w in range(1, 5) for r in rows(w)]
    assert len(ids) == len(set(ids))
