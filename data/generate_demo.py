"""Generate the demo company's support-desk data, deterministically.

Lumenfold is a fictional file-sync and backup company. Its help desk receives tickets (subject + body)
that an agent routes to a queue and answers with a short first reply. The fine-tuned model learns both:
the first line of its answer is ``queue: <label>``, the rest is the reply.

Outputs (all byte-identical for a given seed, so they can be committed and regenerated):
  data/demo/tickets.jsonl   training data for the landing folder, with a few planted bad records
  data/demo/holdout.jsonl   a separate held-out evaluation set, never trained on

Run: python data/generate_demo.py [--seed 7] [--n 2400] [--holdout 300] [--out data/demo]
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

PLANS = ["Personal", "Plus", "Team", "Business"]
CHANNELS = ["email", "web", "chat"]
DEVICES = ["Windows laptop", "MacBook", "Android phone", "iPhone", "Linux desktop", "iPad"]
FIRST_NAMES = [
    "Ana", "Bilal", "Chen", "Dara", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kemal", "Lena",
    "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tomas", "Uma", "Vera", "Wen", "Yusuf",
]
GREETINGS = ["Hi,", "Hello team,", "Hi there,", "Good morning,", "Hey Lumenfold support,", ""]
SIGNOFFS = ["Thanks.", "Thanks in advance.", "Regards.", "Any help appreciated.", "Cheers.", ""]
CONTEXT = [
    "We are on the {plan} plan.",
    "I have been a customer for {years} years.",
    "This is on my {device}.",
    "It started {when}.",
    "",
]
GENERIC_SUBJECTS = ["Need help", "Question", "Urgent", "Problem with my account", "Support request"]
WHEN = ["yesterday", "this morning", "after the last update", "two days ago", "last week", "an hour ago"]


@dataclass(frozen=True)
class Queue:
    """A help-desk queue: how its tickets read and how an agent first answers them."""

    label: str
    subjects: tuple[str, ...]
    problems: tuple[str, ...]
    reply: str


QUEUES: tuple[Queue, ...] = (
    Queue(
        "billing",
        ("Charged twice this month", "Question about my invoice", "Refund request", "Card declined on renewal",
         "Wrong amount on invoice", "VAT number missing on invoice"),
        ("I was charged twice for my {plan} subscription.", "My invoice shows {amount} but I expected less.",
         "Please refund the last payment, I cancelled before renewal.", "The renewal payment failed with my card.",
         "I need the VAT number added to invoice {invoice}.", "Why did the price of my plan go up?"),
        "Thanks {name}. I have passed your invoice question to billing; they reply within one business day.",
    ),
    Queue(
        "login",
        ("Cannot log in", "Password reset email never arrives", "Locked out of my account", "2FA code not accepted",
         "Login loop on the web app", "SSO sign-in fails"),
        ("I cannot log in, the app says my password is wrong.", "The password reset email never arrives.",
         "My account is locked after too many attempts.", "The two-factor code from my phone is rejected.",
         "After I sign in the web app sends me back to the login page.", "Single sign-on fails with an error."),
        "Sorry for the trouble, {name}. I have sent a secure sign-in link; it expires in 30 minutes.",
    ),
    Queue(
        "sync",
        ("Files not syncing", "Sync stuck at 99%", "Folder missing on other device", "Conflicted copies everywhere",
         "Sync is very slow", "Changes not showing up"),
        ("My files stopped syncing on my {device}.", "The sync client is stuck at 99 percent.",
         "A shared folder does not appear on my {device}.", "I see many conflicted copy files after editing.",
         "Uploading a large folder is extremely slow.", "Edits on one device never show up on the other."),
        "Thanks {name}. Please restart the sync client and send us the log file; our sync team will check it.",
    ),
    Queue(
        "restore",
        ("Deleted files by mistake", "Need an older version of a file", "Restore my folder", "Ransomware recovery",
         "Trash was emptied", "Recover overwritten document"),
        ("I deleted a folder by mistake and need it back.", "I need the version of a file from last week.",
         "Can you restore my whole folder to how it was {when}?", "My files were encrypted by ransomware.",
         "I emptied the trash and lost important files.", "I overwrote a document and need the old copy."),
        "Don't worry, {name}. Deleted files are kept for 30 days; I have started a restore for you.",
    ),
    Queue(
        "sharing",
        ("Shared link not working", "Cannot invite teammate", "Link expired too early", "Permission denied on share",
         "Remove access for former employee", "Guest cannot open folder"),
        ("The shared link I sent gives an error to the recipient.", "I cannot invite a teammate to my folder.",
         "My shared link expired sooner than I set.", "A colleague gets permission denied on a shared folder.",
         "How do I remove access for someone who left the company?", "A guest cannot open the folder I shared."),
        "Thanks {name}. I have checked the sharing settings; please resend the link from the Share menu.",
    ),
    Queue(
        "cancellation",
        ("Cancel my subscription", "Close my account", "Downgrade to free", "Stop auto renewal",
         "Delete all my data", "Switching to another provider"),
        ("Please cancel my {plan} subscription.", "I want to close my account completely.",
         "I would like to downgrade to the free plan.", "Please turn off auto renewal for my plan.",
         "Delete all my data and my account.", "We are moving to another provider, how do we cancel?"),
        "We are sorry to see you go, {name}. Your plan ends at the close of the billing period; no further charges.",
    ),
)


def _fill(template: str, rng: random.Random, name: str, plans: list[str] = PLANS) -> str:
    return template.format(
        plan=rng.choice(plans),
        years=rng.randint(1, 9),
        device=rng.choice(DEVICES),
        when=rng.choice(WHEN),
        amount=f"${rng.randint(5, 400)}.{rng.randint(0, 99):02d}",
        invoice=f"INV-{rng.randint(10000, 99999)}",
        name=name,
    )


def make_ticket(rng: random.Random, index: int, start: datetime, queues: tuple[Queue, ...] = QUEUES,
                weights: list[float] | None = None, plans: list[str] = PLANS) -> dict:
    """One realistic ticket: a queue's subject and problem wrapped in customer chatter."""
    queue = rng.choices(queues, weights=weights)[0] if weights else rng.choice(queues)
    name = rng.choice(FIRST_NAMES)
    parts = [rng.choice(GREETINGS), _fill(rng.choice(queue.problems), rng, name, plans)]
    for _ in range(rng.randint(0, 2)):
        parts.append(_fill(rng.choice(CONTEXT), rng, name, plans))
    parts.append(rng.choice(SIGNOFFS))
    body = " ".join(p for p in parts if p)
    created = start + timedelta(minutes=17 * index + rng.randint(0, 16))
    return {
        "ticket_id": f"LF-{100000 + index}",
        "created_at": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "channel": rng.choice(CHANNELS),
        "plan": rng.choice(plans),
        "subject": rng.choice(GENERIC_SUBJECTS) if rng.random() < 0.2 else rng.choice(queue.subjects),
        "body": body,
        "queue": queue.label,
        "answer": _fill(queue.reply, rng, name, plans),
    }


def plant_bad_records(tickets: list[dict], rng: random.Random) -> list[str]:
    """Mix in what real exports contain; returns the JSONL lines, bad ones included.

    Planted: an empty body, an exact duplicate, an overlong body, an e-mail address, a phone number,
    a queue nobody routes to, and a line truncated mid-write. Each must end in quarantine, redaction or
    the duplicate count, never vanish.
    """
    bad = [dict(t) for t in rng.sample(tickets[:200], 5)]
    bad[0]["ticket_id"] = "LF-900001"
    bad[0]["body"] = ""
    bad[1]["ticket_id"] = "LF-900002"
    bad[1]["body"] = "Sync keeps failing. " + "Here is the full client log line again. " * 140
    bad[2]["ticket_id"] = "LF-900003"
    bad[2]["body"] = "Please send the invoice to dara.novak@example.com instead of my old address."
    bad[3]["ticket_id"] = "LF-900004"
    bad[3]["body"] = "I cannot log in. Call me back on +1 415 555 0134 please."
    bad[4]["ticket_id"] = "LF-900005"
    bad[4]["queue"] = "hardware"
    lines = [json.dumps(t, ensure_ascii=False) for t in tickets]
    for i, record in enumerate(bad):
        lines.insert(300 + 250 * i, json.dumps(record, ensure_ascii=False))
    lines.insert(1500, lines[40])  # exact duplicate of an earlier ticket, as a re-export would produce
    truncated = json.dumps(make_ticket(rng, 9999, datetime(2026, 10, 1, tzinfo=UTC)))
    lines.insert(1800, truncated[: len(truncated) // 2])  # a writer crashed mid-line
    return lines


def generate(out: Path, seed: int = 7, n: int = 2400, holdout: int = 300) -> dict[str, Path]:
    rng = random.Random(seed)
    start = datetime(2026, 9, 1, tzinfo=UTC)
    tickets = [make_ticket(rng, i, start) for i in range(n + holdout)]
    train, held = tickets[:n], tickets[n:]
    out.mkdir(parents=True, exist_ok=True)
    paths = {"tickets": out / "tickets.jsonl", "holdout": out / "holdout.jsonl"}
    paths["tickets"].write_text("\n".join(plant_bad_records(train, rng)) + "\n", encoding="utf-8")
    paths["holdout"].write_text(
        "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in held), encoding="utf-8"
    )
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "demo")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--n", type=int, default=2400, help="training tickets (before planted bad records)")
    parser.add_argument("--holdout", type=int, default=300, help="held-out evaluation tickets")
    args = parser.parse_args()
    for name, path in generate(args.out, args.seed, args.n, args.holdout).items():
        print(f"{name}: {path} ({sum(1 for _ in path.open(encoding='utf-8'))} lines)")


if __name__ == "__main__":
    main()
