import json

from conftest import DEMO, DEMO_CONFIG, gate_folder, write_lines
from tuneloop.core.config import load_config
from tuneloop.lib.datasets import load_snapshot, read_snapshot
from tuneloop.tasks.snapshot import write_snapshot


def batch(tmp_path, name, rows):
    cfg = load_config(DEMO_CONFIG)
    land = tmp_path / f"land-{name}"
    write_lines(land / "t.jsonl", [json.dumps(r) for r in rows])
    return gate_folder(land, cfg, tmp_path / f"run-{name}")


def test_snapshot_accumulates_dedups_against_the_previous_version_and_replaces_updated_ids(tmp_path):
    rows = [json.loads(line) for line in (DEMO / "tickets.jsonl").read_text().splitlines()[:30]]
    first = write_snapshot(batch(tmp_path, "a", rows[:20]), tmp_path / "datasets")
    assert (first.n_examples, first.previous, first.n_added) == (20, None, 20)

    edited = {**rows[0], "answer": rows[0]["answer"] + " Sorry for the wait."}  # same id, new content
    second_rows = rows[15:30] + [edited]  # 5 already in the snapshot, 10 new, 1 update
    second = write_snapshot(batch(tmp_path, "b", second_rows), tmp_path / "datasets", first.version)
    assert (second.n_already_present, second.n_replaced, second.n_added) == (5, 1, 11)
    assert second.n_examples == 20 - 1 + 11 == 30
    examples = {e.record_id: e for e in read_snapshot(second)}
    assert examples[rows[0]["ticket_id"]].messages[-1]["content"].endswith("Sorry for the wait.")
    assert first.path.exists() and second.path != first.path  # versions are immutable
    assert load_snapshot(tmp_path / "datasets", second.version).n_examples == 30

    same_again = write_snapshot(batch(tmp_path, "c", rows[:5]), tmp_path / "datasets", first.version)
    assert same_again.version == first.version and same_again.n_added == 0


def test_records_merged_by_mapped_content_are_counted_and_named(tmp_path):
    """The real-model issue saw 699 accepted and '691 new (0 already present, 0 replaced)': 8 records whose
    mapped example equalled another's were merged without a word. Now every accepted record is accounted for."""
    from tuneloop.tasks.snapshot import snapshot_summary

    rows = [json.loads(line) for line in (DEMO / "tickets.jsonl").read_text().splitlines()[:12]]
    twins = [{**rows[i], "ticket_id": f"{rows[i]['ticket_id']}-again"} for i in (2, 5)]  # other id, same example
    checked = batch(tmp_path, "a", rows + twins)
    assert checked.n_accepted == 14 and checked.n_duplicates == 0  # the gate saw two different records
    d = write_snapshot(checked, tmp_path / "datasets")
    assert (d.n_added, d.n_merged, d.n_examples) == (12, 2, 12)
    assert d.merged == [(f"{rows[i]['ticket_id']}-again", rows[i]["ticket_id"]) for i in (2, 5)]
    line = snapshot_summary(d, checked.n_accepted)
    assert "Accepted 14 = 12 new + 0 already present + 2 merged" in line
    assert f"{rows[2]['ticket_id']}-again = {rows[2]['ticket_id']}" in line
