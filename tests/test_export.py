import hashlib
import json

import pytest

from conftest import DEMO, DEMO_CONFIG, accepted, gate_folder
from tuneloop.core.config import ExportConfig, load_config
from tuneloop.lib.datasets import read_snapshot, version_of
from tuneloop.lib.heldout import read_heldout
from tuneloop.tasks.export import export_chat_jsonl
from tuneloop.tasks.snapshot import write_snapshot


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    cfg = load_config(DEMO_CONFIG)
    landing = tmp_path_factory.mktemp("landing")
    (landing / "tickets.jsonl").write_bytes((DEMO / "tickets.jsonl").read_bytes())
    return gate_folder(landing, cfg, tmp_path_factory.mktemp("run"))


def test_dataset_version_is_the_content_not_the_order(checked, tmp_path):
    hashes = [e.content_hash for e in accepted(checked).values()]
    assert version_of(hashes) == version_of(list(reversed(hashes)))
    assert version_of(hashes) != version_of(hashes[1:])
    dataset = write_snapshot(checked, tmp_path)
    assert dataset.version == version_of(hashes) and dataset.n_examples == len(hashes)
    assert dataset.path.name == f"{dataset.version}.jsonl"
    assert {e.content_hash for e in read_snapshot(dataset)} == set(hashes)


def test_export_writes_chat_jsonl_splits_manifest_and_removes_heldout_overlaps(checked, tmp_path):
    cfg = load_config(DEMO_CONFIG)
    dataset = write_snapshot(checked, tmp_path / "datasets")
    heldout = read_heldout(cfg.evaluate.holdout, cfg.mapping)
    exported = export_chat_jsonl(dataset, cfg.export, heldout, tmp_path / "exports")
    train = [json.loads(line) for line in exported.train_path.read_text().splitlines()]
    val = [json.loads(line) for line in exported.validation_path.read_text().splitlines()]
    assert all(list(row) == ["messages"] for row in train + val)
    assert [m["role"] for m in train[0]["messages"]] == ["system", "user", "assistant"]
    manifest = json.loads(exported.manifest_path.read_text())
    removed = manifest["counts"]["heldout_overlaps_removed"]
    assert removed > 0  # the demo's templates do repeat across the two files
    assert len(train) + len(val) + removed == dataset.n_examples
    for label, n in manifest["labels"]["train"].items():  # stratified: each queue split 90/10 on its own
        n_val = manifest["labels"]["validation"].get(label, 0)
        assert abs(n_val - 0.1 * (n + n_val)) <= 0.5 + 1e-9, label
    held_users = {" ".join(h.prompt[-1]["content"].split()).casefold() for h in heldout}
    assert not any(" ".join(r["messages"][1]["content"].split()).casefold() in held_users for r in train + val)
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in val}
    for name, path in (("train.jsonl", exported.train_path), ("validation.jsonl", exported.validation_path)):
        assert manifest["sha256"][name] == hashlib.sha256(path.read_bytes()).hexdigest() == exported.sha256[name]
    assert manifest["dataset_version"] == dataset.version
    assert sum(manifest["labels"]["train"].values()) == len(train)


def test_split_is_deterministic_and_follows_the_seed(checked, tmp_path):
    cfg = load_config(DEMO_CONFIG)
    dataset = write_snapshot(checked, tmp_path / "datasets")
    one = export_chat_jsonl(dataset, cfg.export, [], tmp_path / "a")
    two = export_chat_jsonl(dataset, cfg.export, [], tmp_path / "b")
    other = export_chat_jsonl(dataset, ExportConfig(seed=1), [], tmp_path / "c")
    assert one.sha256 == two.sha256
    assert one.sha256 != other.sha256


def test_manifest_has_token_stats_and_a_paid_plan_gets_a_cost_estimate(checked, tmp_path):
    from tuneloop.core.config import OpenAITrainConfig
    from tuneloop.lib.tokens import openai_counter
    from tuneloop.tasks.export import TokenPlan, token_plan

    cfg = load_config(DEMO_CONFIG)
    dataset = write_snapshot(checked, tmp_path / "datasets")
    local = export_chat_jsonl(dataset, cfg.export, [], tmp_path / "local", token_plan(cfg.train, tmp_path / "m"), "cfg1")
    manifest = json.loads(local.manifest_path.read_text())
    t = manifest["tokens"]["train"]
    assert t["counted_with"] == "chat-template:tiny" and t["limit"] == cfg.train.local.max_length
    assert t["n_examples"] == local.n_train and t["min"] <= t["p50"] <= t["p95"] <= t["max"]
    assert manifest["estimate"] is None and manifest["config_hash"] == "cfg1"
    assert manifest["snapshot_sha256"] == hashlib.sha256(dataset.path.read_bytes()).hexdigest()

    openai = OpenAITrainConfig()  # gpt-4o-mini's o200k_base, offline
    plan = TokenPlan(counter=openai_counter(openai.model, openai, tmp_path), limit=openai.spec().context_tokens, openai=openai, model=openai.model)
    paid = export_chat_jsonl(dataset, cfg.export, [], tmp_path / "paid", plan)
    est = paid.estimate
    assert est.epochs == 3 and est.tokens_per_epoch == paid.token_stats["train"].total
    assert est.estimated_cost_usd == round(est.tokens_per_epoch * 3 / 1e6 * 3.00, 4)
    assert json.loads(paid.manifest_path.read_text())["estimate"] == est.model_dump()


def test_same_inputs_reuse_the_export_and_changed_files_are_rebuilt(checked, tmp_path):
    cfg = load_config(DEMO_CONFIG)
    dataset = write_snapshot(checked, tmp_path / "datasets")
    first = export_chat_jsonl(dataset, cfg.export, [], tmp_path / "exports")
    again = export_chat_jsonl(dataset, cfg.export, [], tmp_path / "exports")
    assert not first.reused and again.reused and again.directory == first.directory
    first.train_path.write_text("tampered\n")
    rebuilt = export_chat_jsonl(dataset, cfg.export, [], tmp_path / "exports")
    assert not rebuilt.reused and rebuilt.sha256 == first.sha256


def test_an_invalid_example_is_never_exported(tmp_path):
    import orjson

    from tuneloop.core.records import DatasetVersion, TuneloopError

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}],
             "record_id": str(i), "source": "in.jsonl", "line": i + 1, "content_hash": f"{i:064x}"} for i in range(12)]
    rows[5]["messages"][-1]["weight"] = 0.5
    path = tmp_path / "snap.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    dataset = DatasetVersion(version="v1", path=path, n_examples=12)
    with pytest.raises(TuneloopError, match=r"1 examples are not valid chat examples: in.jsonl:6 \(5\): invalid_weight"):
        export_chat_jsonl(dataset, ExportConfig(), [], tmp_path / "exports")
    assert not (tmp_path / "exports").exists() or not any((tmp_path / "exports").iterdir())


def _long_snapshot(tmp_path, n=12):
    import orjson

    from tuneloop.core.records import DatasetVersion

    words = "the sync folder on my laptop stopped after the update and the invoice page is blank again".split()
    rows = []
    for i in range(n):
        user = " ".join(words[(i + k) % len(words)] for k in range(8))
        if i < 3:  # three long prompts: their start and end must survive, their answers whole
            user = f"START{i} " + " ".join(words * 40) + f" END{i}"
        answer = "queue: billing\nThanks, we are on it." if i != 3 else "queue: billing\n" + " ".join(words * 40)
        rows.append({"messages": [{"role": "system", "content": "Route the ticket."}, {"role": "user", "content": user},
                                  {"role": "assistant", "content": answer}],
                     "label": "billing", "record_id": f"r{i}", "source": "in.jsonl", "line": i + 1,
                     "content_hash": f"{i:064x}"})
    path = tmp_path / "snap.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return DatasetVersion(version="long", path=path, n_examples=n), rows


@pytest.mark.parametrize("policy", ["trim_prompt", "quarantine"])
def test_an_example_over_the_token_limit_never_loses_its_answer(tmp_path, policy):
    """The trainer would cut from the right, i.e. the answer: the export trims the prompt's middle or sets the
    example aside with reason too_many_tokens; either way every example it writes fits, its answer whole."""
    from tuneloop.tasks.export import token_plan

    cfg = load_config(DEMO_CONFIG, ["train.local.max_length=128"])
    dataset, rows = _long_snapshot(tmp_path)
    plan = token_plan(cfg.train, tmp_path / "models")
    exported = export_chat_jsonl(dataset, ExportConfig(too_long=policy), [], tmp_path / "exports", plan)
    written = [json.loads(line)["messages"] for p in (exported.train_path, exported.validation_path)
               for line in p.read_text().splitlines()]
    assert max(plan.counter.count(written)) <= 128
    answers = {m[-1]["content"] for m in written}
    by_id = {r["record_id"]: r for r in rows}
    set_aside = [json.loads(line) for line in (exported.directory / "too_long.jsonl").read_text().splitlines()]
    # r3's answer alone is over the limit: set aside under either policy, with where it came from
    assert {"r3"} <= {q["record_id"] for q in set_aside}
    assert all(q["reason"] == "too_many_tokens" and q["tokens"] > 128 and q["line"] for q in set_aside)
    if policy == "trim_prompt":
        assert exported.n_prompt_trimmed == 3 and exported.n_too_long == 1
        trimmed = [m for m in written if m[1]["content"].startswith("START")]
        assert len(trimmed) == 3
        for m in trimmed:
            i = m[1]["content"][5]
            assert m[1]["content"].endswith(f"END{i}") and "[...]" in m[1]["content"]
            assert m[0] == by_id[f"r{i}"]["messages"][0] and m[2] == by_id[f"r{i}"]["messages"][2]
    else:
        assert exported.n_prompt_trimmed == 0 and exported.n_too_long == 4
        assert {q["record_id"] for q in set_aside} == {"r0", "r1", "r2", "r3"}
    assert len(written) + exported.n_too_long == len(rows)  # nothing lost: written or set aside with a reason
    assert answers <= {r["messages"][2]["content"] for r in rows}  # every answer as it was written
    manifest = json.loads(exported.manifest_path.read_text())
    assert manifest["counts"]["too_many_tokens"] == exported.n_too_long
    assert manifest["counts"]["prompt_trimmed"] == exported.n_prompt_trimmed


def test_a_prompt_is_never_trimmed_to_nothing_and_each_set_aside_example_says_why(tmp_path):
    """The real-model issue's case: a long system message and a small max_length cut user messages down to
    "[...]", and they were trained on; and 'the system message and the answer alone do not fit' was said of
    examples it was not true of. Now: trimmed only while a floor of the prompt survives, else set aside saying
    so; 'do not fit' only when it is true; the counts in the manifest and the summary."""
    import orjson

    from tuneloop.core.records import DatasetVersion
    from tuneloop.lib.length import ENOUGH_KEPT_CHARS, MIN_KEPT_SHARE
    from tuneloop.tasks.export import manifest_summary, token_plan

    cfg = load_config(DEMO_CONFIG, ["train.local.max_length=128"])
    plan = token_plan(cfg.train, tmp_path / "models")
    ticket = "The sync folder on my laptop stopped after the update, and the invoice page is blank again. " * 2
    system = "Route the ticket."
    while plan.counter.count([[{"role": "system", "content": system + " Be brief."}, {"role": "user", "content": "[...]"},
                               {"role": "assistant", "content": "queue: billing"}]])[0] <= 122:
        system += " Be brief."  # until it leaves the ticket at most 6 tokens of the 128
    rows = []
    for i, (sys_msg, user, answer) in enumerate([
            (system, ticket, "queue: billing"),                       # fits only as a sliver of the ticket
            ("Route it.", ticket * 12, "queue: billing"),              # long, trimmed, plenty kept
            ("Route it.", ticket, "queue: billing " + "again " * 150),  # the answer alone is over the limit
            ("Route it.", "short ticket", "queue: billing")]):         # fits as it is
        rows.append({"messages": [{"role": "system", "content": sys_msg}, {"role": "user", "content": user},
                                  {"role": "assistant", "content": answer}], "label": "billing",
                     "record_id": f"r{i}", "source": "in.jsonl", "line": i + 1, "content_hash": f"{i:064x}"})
    path = tmp_path / "snap.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    exported = export_chat_jsonl(DatasetVersion(version="floor", path=path, n_examples=4), ExportConfig(), [],
                                 tmp_path / "exports", plan)
    written = {json.loads(line)["messages"][1]["content"] for p in (exported.train_path, exported.validation_path)
               for line in p.read_text().splitlines()}
    assert "[...]" not in written and not any(len(w.replace("[...]", "").strip()) < 10 for w in written)
    set_aside = {q["record_id"]: q["detail"] for q in map(json.loads, (exported.directory / "too_long.jsonl")
                                                          .read_text().splitlines())}
    assert set(set_aside) == {"r0", "r2"} and exported.n_prompt_trimmed == 1 and len(written) == 2
    assert set_aside["r0"].endswith(f"trimming the user message to fit would keep less than {MIN_KEPT_SHARE:.0%} of "
                                    f"it (or {ENOUGH_KEPT_CHARS} characters): raise train.local.max_length")
    assert set_aside["r2"].endswith("the system message and the answer alone do not fit")
    assert "do not fit" not in set_aside["r0"]
    counts = json.loads(exported.manifest_path.read_text())["counts"]
    assert (counts["too_many_tokens"], counts["too_many_tokens_no_room"], counts["too_many_tokens_below_floor"]) \
        == (2, 1, 1)
    assert ("2 examples set aside as too_many_tokens (1 whose system message and answer alone do not fit, 1 whose "
            "prompt would be trimmed below the floor (25% of it))") in manifest_summary(exported)
    trimmed = next(w for w in written if "[...]" in w)
    # the most that fits is kept, not a guess far below it: a dozen characters more would not fit
    from tuneloop.lib.length import _cut

    kept = len(trimmed) - len(" [...] ")
    more = [*rows[1]["messages"][:1], {"role": "user", "content": _cut(ticket * 12, kept + 12)}, rows[1]["messages"][2]]
    assert plan.counter.count([more])[0] > 128 and kept > 2 * ENOUGH_KEPT_CHARS


def test_held_out_prompts_are_held_to_the_training_limit_by_the_same_policy(tmp_path):
    """Training saw at most max_length tokens; evaluation asked prompts of 350. Now the held-out set is fitted
    with its reference answer as training examples are: trimmed, or left out of evaluation and counted."""
    from tuneloop.lib.heldout import HeldOutExample, read_fitted_heldout
    from tuneloop.tasks.export import manifest_summary, token_plan

    cfg = load_config(DEMO_CONFIG, ["train.local.max_length=128"])
    plan = token_plan(cfg.train, tmp_path / "models")
    dataset, _ = _long_snapshot(tmp_path)
    long_ticket = "START " + "the invoice page is blank again and the sync stopped " * 40 + " END"

    def held(i: int, user: str, expected: str = "queue: access") -> HeldOutExample:
        return HeldOutExample(record_id=f"h{i}", prompt=[{"role": "system", "content": "Route the ticket."},
                                                         {"role": "user", "content": user}],
                              expected=expected, label="access", content_hash=f"{i:064x}")

    heldout = [held(0, long_ticket), held(1, "my password reset mail never arrives"),
               held(2, "short", "queue: access " + "and more " * 200)]
    exported = export_chat_jsonl(dataset, ExportConfig(), heldout, tmp_path / "exports", plan)
    fitted = read_fitted_heldout(exported.heldout_path)
    assert [h.record_id for h in fitted] == ["h0", "h1"]  # h2's reference alone is over the limit
    for h in fitted:
        assert plan.counter.count([[*h.prompt, {"role": "assistant", "content": h.expected}]])[0] <= 128
    assert fitted[0].prompt[1]["content"].startswith("START") and fitted[0].prompt[1]["content"].endswith("END")
    assert "[...]" in fitted[0].prompt[1]["content"] and fitted[1] == heldout[1]
    assert (exported.n_heldout, exported.n_heldout_trimmed, exported.n_heldout_too_long) == (2, 1, 1)
    counts = json.loads(exported.manifest_path.read_text())["counts"]
    assert (counts["heldout"], counts["heldout_prompt_trimmed"], counts["heldout_too_many_tokens"]) == (2, 1, 1)
    assert "held-out, held to the same limit: 2 evaluated, 1 prompts trimmed, 1 set aside" in manifest_summary(exported)


def test_counted_on_a_second_thread_each_example_keeps_its_own_count_after_held_out_removal(checked, tmp_path,
                                                                                            monkeypatch):
    """The export counts chunks of the snapshot while parsing the next (tasks/export.py) and realigns the counts
    after held-out overlaps are removed: with a limit inside the demo's range, every exported example must
    recount under it and every set-aside one over it (a shifted count would break both)."""
    import orjson

    import tuneloop.tasks.export as export_stage
    from tuneloop.core.config import OpenAITrainConfig
    from tuneloop.lib.datasets import read_examples_in_chunks
    from tuneloop.lib.tokens import QuicktokCounter, openai_counter
    from tuneloop.tasks.export import TokenPlan

    cfg = load_config(DEMO_CONFIG)
    heldout = read_heldout(cfg.evaluate.holdout, cfg.mapping, None)
    dataset = write_snapshot(checked, tmp_path / "datasets")
    openai = OpenAITrainConfig()
    counter = openai_counter(openai.model, openai, tmp_path)
    assert isinstance(counter, QuicktokCounter)
    counts = sorted(counter.count([e.messages for e in read_snapshot(dataset)]))
    limit = counts[len(counts) * 3 // 4]
    # small chunks: many hand-offs between the threads
    monkeypatch.setattr(export_stage, "read_examples_in_chunks", lambda path: read_examples_in_chunks(path, 7))
    exported = export_chat_jsonl(dataset, ExportConfig(too_long="quarantine"), heldout, tmp_path / "exports",
                                 TokenPlan(counter=counter, limit=limit, openai=openai, model=openai.model))
    assert exported.n_heldout_overlaps > 0 and exported.n_too_long > 0
    kept = [orjson.loads(line)["messages"] for p in (exported.train_path, exported.validation_path) for line in p.open("rb")]
    assert max(counter.count(kept)) <= limit
    assert exported.token_stats["train"].total + exported.token_stats["validation"].total == sum(counter.count(kept))
    set_aside = [orjson.loads(line) for line in (exported.directory / "too_long.jsonl").open("rb")]
    by_id = {e.record_id: e.messages for e in read_snapshot(dataset)}
    assert min(counter.count([by_id[q["record_id"]] for q in set_aside])) > limit


def test_write_jsonl_returns_the_hash_of_what_it_wrote(checked, tmp_path):
    from tuneloop.tasks.export import write_jsonl

    examples = list(accepted(checked).values())
    many = (examples * (25_000 // len(examples) + 1))[:25_000]  # three blocks of the writer
    digest = write_jsonl(tmp_path / "t.jsonl", many)
    written = (tmp_path / "t.jsonl").read_bytes()
    assert digest == hashlib.sha256(written).hexdigest() and written.count(b"\n") == 25_000
    assert json.loads(written.splitlines()[-1]) == {"messages": many[-1].messages}


def test_an_example_the_counter_cannot_read_is_named_by_the_format_check_not_a_traceback(tmp_path):
    """Counting starts before the examples are checked (on a second thread, chunk by chunk); an example that
    breaks the counter (content holding an integer beyond 64 bits: JSON parses it, the counter cannot write it
    as JSON to count it) must still be
    reported by the format check, with its file and line."""
    from tuneloop.core.config import OpenAITrainConfig
    from tuneloop.core.records import DatasetVersion, TuneloopError
    from tuneloop.lib.tokens import openai_counter
    from tuneloop.tasks.export import TokenPlan

    good = [{"role": "user", "content": f"q{i}"} for i in range(3)]
    rows = [{"messages": [m, {"role": "assistant", "content": "a"}], "record_id": f"r{i}", "source": "in.jsonl",
             "line": i + 1, "content_hash": f"{i:064x}"} for i, m in enumerate(good)]
    rows[1]["messages"][1]["content"] = {"n": 2 ** 70}
    path = tmp_path / "v1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json writes big ints; orjson would refuse
    openai = OpenAITrainConfig()
    plan = TokenPlan(counter=openai_counter(openai.model, openai, tmp_path), limit=1000, openai=openai, model=openai.model)
    with pytest.raises(TuneloopError, match=r"in.jsonl:2 \(r1\): missing_content"):
        export_chat_jsonl(DatasetVersion(version="v1", path=path, n_examples=3), ExportConfig(), [], tmp_path / "e", plan)


def _examples(n: int, labels: int = 4):
    from tuneloop.core.records import ChatExample

    return [ChatExample(messages=[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
                        label=f"l{i % labels}", record_id=str(i), source="s.jsonl", line=i + 1,
                        content_hash=hashlib.sha256(str(i).encode()).hexdigest()) for i in range(n)]


@pytest.mark.parametrize(("n", "expected"), [(150, 37), (400, 50), (2400, 240), (12, 4), (3, 1)])
def test_the_validation_split_is_big_enough_to_stop_on_where_the_data_allows(n, expected):
    """A tenth of 150 examples is 15: a validation loss that moves with which 15, so early stopping and the
    best checkpoint would follow noise. export.min_validation (50) raises it, up to about a quarter of the data
    (each label keeps its share: 12 examples of 4 labels give one of each)."""
    from tuneloop.tasks.export import split_examples

    train, validation = split_examples(_examples(n), 0.1, "0:v", ExportConfig().min_validation)
    assert len(validation) == expected and len(train) + len(validation) == n
    assert {e.label for e in validation} == {e.label for e in _examples(n)} if n >= 12 else True  # stratified
    assert not {e.record_id for e in train} & {e.record_id for e in validation}


def test_too_few_validation_examples_train_the_whole_budget_and_say_why():
    from tuneloop.lib.lora import early_stopping

    assert early_stopping(3, 50) == (3, None)
    assert early_stopping(None, 5) == (None, None)
    patience, note = early_stopping(3, 12)
    assert patience is None and "12 validation examples are too few to stop on" in note


@pytest.mark.parametrize("labels", [lambda i: f"l{i % 100}", lambda i: "big" if i < 120 else f"rare{i}",
                                    lambda i: f"l{i % 30}"], ids=["100x2", "long-tail", "30x5"])
def test_raising_the_validation_split_never_takes_a_labels_last_training_example(labels):
    from tuneloop.core.records import ChatExample
    from tuneloop.tasks.export import split_examples, validation_size

    examples = [ChatExample(messages=[], label=labels(i), record_id=str(i), source="s.jsonl", line=i + 1,
                            content_hash=hashlib.sha256(str(i).encode()).hexdigest()) for i in range(160)]
    train, validation = split_examples(examples, 0.1, "0:v", 50)
    assert {e.label for e in train} == {e.label for e in examples}  # every label still trains
    assert len(validation) == validation_size(160, 0.1, 50) == 40 and len(train) + len(validation) == 160
