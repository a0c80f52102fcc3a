"""Generate a dataset that is not the demo: Pinecrest Home's product reviews, routed to ten departments.

Other field names (``review_id``, ``title``, ``review_text``, ``department``, ``reply``, ``rating``,
``created_at``), other labels (ten departments, two with a space in their name) and a reply to learn as
generation. Each department sells 10 products; a review names one (in the title and the text, or only in
the text), says in 60% of cases the room it is used in, sometimes mentions a product of another department
in passing, and about 3% of
reviews are filed under a neighbouring department (label noise, as in real routing data). So a model
learns the catalogue product by product, and more data keeps helping: what the two-batch benchmark needs.

Outputs, deterministic for a seed: ``batch-1.jsonl`` (the backlog), ``batch-2.jsonl`` (what lands later,
newer ``created_at``), and ``reviews.db`` (the same rows in a SQLite table ``reviews``, for the SQL source).

Run: python data/generate_reviews.py [--out data/reviews] [--batch1 2000] [--batch2 1000] [--seed 5]
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

CATALOGUE = {
    "bath": "towel bathrobe shower-curtain bath-mat soap-dish toothbrush-holder shower-caddy loofah razor-stand "
            "scale hamper mirror plunger faucet-filter bidet-seat towel-warmer shower-head drain-cover "
            "cotton-swab-jar vanity-tray bath-pillow foot-scrubber shower-squeegee bath-tray",
    "bedding": "duvet pillow sheet-set mattress-topper blanket quilt comforter bed-skirt pillowcase weighted-blanket "
               "electric-blanket crib-sheet mattress-protector bolster bedspread throw headboard-cushion "
               "body-pillow sleep-mask cooling-pad feather-bed fitted-sheet duvet-cover pillow-protector",
    "cookware": "frying-pan saucepan wok dutch-oven stockpot griddle steamer pressure-cooker roasting-tin "
                "baking-sheet muffin-tray skillet casserole grill-pan crepe-pan sauté-pan cake-tin "
                "pie-dish tagine fondue-set paella-pan splatter-guard milk-pan egg-poacher",
    "electronics": "headphones speaker charger power-bank earbuds smartwatch tablet-stand webcam router "
                   "extension-lead hdmi-cable e-reader projector soundbar doorbell-camera smart-plug "
                   "keyboard mouse usb-hub dash-cam radio turntable microphone label-printer",
    "garden": "hose-reel lawnmower rake trowel planter compost-bin seed-tray watering-can pruning-shears "
              "leaf-blower hedge-trimmer wheelbarrow bird-feeder sprinkler garden-kneeler greenhouse "
              "trellis water-butt weed-puller lopper soil-tester cold-frame edging-roll strimmer",
    "home office": "desk-lamp office-chair monitor-arm filing-cabinet desk-organiser whiteboard footrest "
                   "standing-desk paper-shredder bookshelf cable-tray desk-mat laptop-riser pen-holder "
                   "noticeboard drawer-unit wrist-rest document-tray desk-fan letter-tray stapler "
                   "hole-punch desk-clock privacy-screen",
    "kids": "building-blocks puzzle doll rocking-horse scooter tricycle crayons play-tent teddy-bear "
            "train-set sandpit kite balance-bike stacking-cups toy-kitchen marble-run baby-gate "
            "high-chair night-light bath-toys jigsaw skipping-rope craft-kit story-cube",
    "outdoor": "tent sleeping-bag camping-stove cool-box hammock lantern picnic-blanket camping-chair "
               "windbreak head-torch water-filter rucksack trekking-poles fire-pit parasol gazebo "
               "bbq patio-heater sun-lounger bike-rack kayak-paddle bivvy-bag tarp camp-kettle",
    "pet supplies": "cat-tree dog-bed litter-tray pet-carrier scratching-post dog-lead aquarium bird-cage "
                    "pet-fountain chew-toy grooming-brush hamster-wheel dog-crate cat-flap pet-ramp "
                    "food-bowl harness nail-clipper pet-camera dog-coat fish-net pet-gate catnip-toy rabbit-hutch",
    "tools": "cordless-drill hammer screwdriver-set spirit-level tape-measure jigsaw-saw sander stud-finder "
             "workbench toolbox socket-set wrench clamp chisel heat-gun glue-gun multimeter tile-cutter "
             "paint-sprayer ladder angle-grinder mitre-saw pliers utility-knife",
}
DEPARTMENTS = sorted(CATALOGUE)
ROOMS = {"bath": "bathroom", "bedding": "bedroom", "cookware": "kitchen", "electronics": "living room",
         "garden": "vegetable patch", "home office": "study", "kids": "nursery", "outdoor": "campsite",
         "pet supplies": "dog basket corner", "tools": "workshop"}
PER_DEPARTMENT = 10  # products sold per department (the catalogue lists more, for a harder variant)
NEIGHBOUR = {d: DEPARTMENTS[(i + 1) % len(DEPARTMENTS)] for i, d in enumerate(DEPARTMENTS)}
OPENINGS = ["I bought the {p} last month.", "Our new {p} arrived on Tuesday.", "Ordered the {p} as a gift.",
            "Second {p} from Pinecrest.", "Picked up the {p} in the spring sale.", "We replaced our old {p}."]
VERDICTS = {5: ["Brilliant, exactly as described.", "Best purchase this year."],
            4: ["Very good, one small niggle.", "Solid and well made."],
            3: ["It is fine, nothing special.", "Does the job, but only just."],
            2: ["Disappointing after a week.", "Not what the photos promised."],
            1: ["It broke almost at once.", "Returned it, avoid."]}
DETAILS = ["Delivery took three days.", "The box was dented but the item was fine.", "Assembly was quick.",
           "The instructions were unclear.", "It is lighter than expected.", "The colour matches the website.",
           "Customer service answered my email the same day.", "It feels cheaper than the price suggests.",
           "My partner uses it every day.", "It came with a spare part.", "The packaging was all cardboard."]
REPLIES = {5: "Thank you for the kind words about the {p}! Our {d} team will be delighted.",
           4: "Thanks for reviewing the {p}. We have passed your note to the {d} team.",
           3: "Thanks for your honest review of the {p}. Our {d} team would like to hear how it could be better.",
           2: "We are sorry the {p} disappointed you. Our {d} team will contact you about a replacement.",
           1: "We are very sorry about the {p}. Our {d} team will arrange a refund or replacement today."}


def products(per_department: int = PER_DEPARTMENT) -> dict[str, list[str]]:
    return {d: [w.replace("-", " ") for w in CATALOGUE[d].split()][:per_department] for d in DEPARTMENTS}


def review(i: int, rng: random.Random, when: datetime) -> dict:
    catalogue = products()
    dept = rng.choice(DEPARTMENTS)
    product = rng.choice(catalogue[dept])
    rating = rng.choices([5, 4, 3, 2, 1], weights=[4, 3, 2, 1.5, 1.5])[0]
    title_has_product = rng.random() < 0.6
    title = (f"{rng.choice(VERDICTS[rating]).rstrip('.')} - {product}" if title_has_product
             else rng.choice(VERDICTS[rating]).rstrip("."))
    parts = [rng.choice(OPENINGS).format(p=product), rng.choice(VERDICTS[rating]),
             *rng.sample(DETAILS, rng.randint(1, 3))]
    if rng.random() < 0.6:  # where it is used: a strong hint, but not in every review
        parts.insert(rng.randint(1, len(parts)), f"It lives in our {ROOMS[dept]} now.")
    if rng.random() < 0.2:  # a product of another department, in passing
        other = rng.choice([d for d in DEPARTMENTS if d != dept])
        parts.insert(rng.randint(1, len(parts)), f"I also looked at the {rng.choice(catalogue[other])}.")
    filed = NEIGHBOUR[dept] if rng.random() < 0.03 else dept  # routing noise
    return {
        "review_id": f"PH-{100_000 + i}",
        "title": title,
        "review_text": " ".join(parts),
        "department": filed,
        "reply": REPLIES[rating].format(p=product, d=filed),
        "rating": rating,
        "created_at": when.isoformat(timespec="seconds"),
    }


def generate(out: Path, batch1: int = 2000, batch2: int = 1000, seed: int = 5) -> dict[str, Path]:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    start = datetime(2026, 3, 1, tzinfo=UTC).replace(tzinfo=None)
    rows = [review(i, rng, start + timedelta(minutes=37 * i)) for i in range(batch1 + batch2)]
    paths = {"batch-1": out / "batch-1.jsonl", "batch-2": out / "batch-2.jsonl", "db": out / "reviews.db"}
    for name, part in (("batch-1", rows[:batch1]), ("batch-2", rows[batch1:])):
        paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    paths["db"].unlink(missing_ok=True)
    with sqlite3.connect(paths["db"]) as db:
        db.execute("CREATE TABLE reviews (review_id TEXT PRIMARY KEY, title TEXT, review_text TEXT, "
                   "department TEXT, reply TEXT, rating INTEGER, created_at TEXT)")
        db.executemany("INSERT INTO reviews VALUES (:review_id, :title, :review_text, :department, :reply, "
                       ":rating, :created_at)", rows[:batch1])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "reviews")
    parser.add_argument("--batch1", type=int, default=2000)
    parser.add_argument("--batch2", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    for name, path in generate(args.out, args.batch1, args.batch2, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
