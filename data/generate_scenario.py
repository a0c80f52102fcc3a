"""Generate the drift scenario: Lumenfold's support tickets over several weeks, changing at a known week.

Weeks before ``drift_at`` look like the demo data. From ``drift_at`` on, three things change at once, as
they do after a launch:
  * a new product, the Lumenfold Hub (a home backup box), brings a new ticket queue ``hub`` (about 30% of
    tickets) with words the model has never seen (firmware, pairing, LED, NAS, ethernet);
  * the Business plan is renamed Scale;
  * a pricing-policy change moves plan changes (downgrades, auto-renewal) from ``cancellation`` to
    ``billing``, whose reply changes too: the same kind of ticket now has another right answer.

Outputs, deterministic for a seed: ``week-<k>.jsonl`` (what lands that week, for training) and
``week-<k>-eval.jsonl`` (labeled tickets of the same week, never trained on, to score models on).

Run: python data/generate_scenario.py [--out data/scenario] [--weeks 6] [--drift-at 3]
"""

from __future__ import annotations

import argparse
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

from generate_demo import PLANS, QUEUES, Queue, make_ticket

HUB = Queue(
    "hub",
    ("Hub not pairing", "Hub LED blinking amber", "Hub firmware update failed", "Hub not visible on network",
     "Hub backup stuck", "Hub disk full"),
    ("My Lumenfold Hub will not pair with the app.", "The Hub LED keeps blinking amber after setup.",
     "The Hub firmware update failed halfway and it reboots.", "The Hub is not visible on my ethernet network.",
     "The Hub backup of my NAS is stuck at 12 percent.", "The Hub says its disk is full but it is new."),
    "Thanks {name}. Hold the Hub's reset button for ten seconds, then re-pair it; our hardware team is copied.",
)
BILLING_AFTER = Queue(
    "billing",
    QUEUES[0].subjects + ("Downgrade to free", "Stop auto renewal"),
    QUEUES[0].problems + ("I would like to downgrade to the free plan.", "Please turn off auto renewal for my plan."),
    "Thanks {name}. Under our new pricing, plan changes are prorated; billing will confirm the new amount today.",
)
CANCELLATION_AFTER = Queue(
    "cancellation",
    ("Cancel my subscription", "Close my account", "Delete all my data", "Switching to another provider"),
    ("Please cancel my {plan} subscription.", "I want to close my account completely.",
     "Delete all my data and my account.", "We are moving to another provider, how do we cancel?"),
    QUEUES[5].reply,
)


def week_queues(week: int, drift_at: int) -> tuple[tuple[Queue, ...], list[float] | None]:
    if week < drift_at:
        return QUEUES, None
    queues = (BILLING_AFTER, *QUEUES[1:5], CANCELLATION_AFTER, HUB)
    return queues, [1, 1, 1, 1, 1, 1, 2.6]  # the Hub takes ~30% of tickets


def generate(out: Path, seed: int = 11, weeks: int = 6, drift_at: int = 3, per_week: int = 600,
             eval_per_week: int = 150, first_week: int = 2000) -> list[dict[str, Path]]:
    """Week 1 is the backlog the first model is trained on (``first_week`` tickets); then ``per_week``."""
    rng = random.Random(seed)
    start = datetime(2026, 9, 7, tzinfo=UTC)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    index = 0
    for week in range(1, weeks + 1):
        queues, weights = week_queues(week, drift_at)
        plans = PLANS if week < drift_at else [p if p != "Business" else "Scale" for p in PLANS]
        n = first_week if week == 1 else per_week
        tickets = [make_ticket(rng, index + i, start + timedelta(weeks=week - 1), queues, weights, plans)
                   for i in range(n + eval_per_week)]
        index += n + eval_per_week
        week_paths = {"train": out / f"week-{week}.jsonl", "eval": out / f"week-{week}-eval.jsonl"}
        week_paths["train"].write_text("".join(json.dumps(t) + "\n" for t in tickets[:n]))
        week_paths["eval"].write_text("".join(json.dumps(t) + "\n" for t in tickets[n:]))
        paths.append(week_paths)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "scenario")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--weeks", type=int, default=6)
    parser.add_argument("--drift-at", type=int, default=3)
    parser.add_argument("--per-week", type=int, default=600)
    args = parser.parse_args()
    for week, p in enumerate(generate(args.out, args.seed, args.weeks, args.drift_at, args.per_week), start=1):
        print(f"week {week}: {p['train']} + {p['eval'].name}")


if __name__ == "__main__":
    main()
