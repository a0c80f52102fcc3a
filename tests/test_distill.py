"""Distillation: the champion answers the records that came without an answer (tasks/distill.py), through the
real ``openai`` SDK against the fake server for an API champion, and on its own base model for a local one."""

import json

import orjson
import pytest
from fake_openai import FakeOpenAI, Fault

from conftest import DEMO, DEMO_CONFIG, gate_folder, write_lines
from tuneloop.core.config import load_config
from tuneloop.core.records import Champion, ChatExample, TuneloopError
from tuneloop.tasks.distill import distill, migration_config

KEY = "sk-test-DISTILL-0123456789abcdef"
FT = "ft:gpt-4o-mini-2024-07-18:acme::teach1"
TEACHER = "queue: billing\nThanks, our billing team is on it."


def landing(root, n_labelled=20, n_unlabelled=10):
    """Demo tickets: the first labelled, the next without their queue and answer (as the API model wrote
    them in production), and one unlabelled record that fails another check (an empty subject)."""
    rows = [json.loads(line) for line in (DEMO / "tickets.jsonl").read_text().splitlines()[:n_labelled + n_unlabelled + 1]]
    for row in rows[n_labelled:]:
        row.pop("queue"), row.pop("answer")
    rows[-1]["subject"] = ""
    folder = root / "landing"
    write_lines(folder / "t.jsonl", [json.dumps(r) for r in rows])
    return folder


def stranger_config(folder, checked_column: str, mapping: str):
    """A generation task on someone else's fields: its own one-expectation suite and mapping (YAML flow map)."""
    suite = folder / "suite.json"
    suite.write_text(json.dumps({"name": "theirs", "expectations": [
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": checked_column}}]}))
    cfg_file = folder / "theirs.yaml"
    cfg_file.write_text(f"mapping: {mapping}\nquality: {{suite: {suite}}}\n"
                        f"evaluate: {{holdout: {DEMO / 'holdout.jsonl'}, task: generation}}\n")
    return cfg_file


def api_config(fake, *more):
    return load_config(DEMO_CONFIG, [
        "distill.teacher=champion", "distill.batch_size=4", f"train.openai.base_url={fake.base_url}",
        "train.openai.provider=compatible", "train.openai.eval_concurrency=1", "train.openai.request_retries=0",
        "train.max_cost_usd=1", *more])


def champion_api():
    return Champion(version="3", backend="openai", fine_tuned_model=FT, base_model="gpt-4o-mini-2024-07-18")


def completions(fake):
    return [r for r in fake.requests if r[1].endswith("/chat/completions")]


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def test_without_a_teacher_a_record_lacking_its_answer_is_quarantined_never_trained_on_as_none(tmp_path):
    """A stranger's data, whose suite checks nothing about the answer: an empty answer field would otherwise be
    rendered as the text "None" and trained on."""
    cfg = load_config(stranger_config(tmp_path, "question", "{id: qid, user: '{question}', assistant: '{reply}'}"))
    write_lines(tmp_path / "in" / "faq.jsonl", [
        json.dumps({"qid": 1, "question": "How do I reset my password?", "reply": "Use the link on the sign-in page."}),
        json.dumps({"qid": 2, "question": "Can I pay by invoice?", "reply": None}),
        json.dumps({"qid": 3, "question": "Where is my data stored?"})])
    checked = gate_folder(tmp_path / "in", cfg, tmp_path / "run")
    assert (checked.n_read, checked.n_accepted, checked.n_quarantined, checked.n_unlabelled) == (3, 1, 2, 0)
    reasons = [orjson.loads(line)["reasons"] for line in checked.quarantine_path.read_bytes().splitlines()]
    assert reasons == [["missing_answer(reply)"], ["missing_answer(reply)"]]
    assert b"None" not in checked.accepted_path.read_bytes()


def test_an_api_champion_answers_the_unlabelled_records_once_counted_costed_and_cached(tmp_path, key):
    with FakeOpenAI(answer=lambda model, messages: TEACHER) as fake:
        fake.valid_key = KEY
        cfg = api_config(fake)
        checked = gate_folder(landing(tmp_path), cfg, tmp_path / "run", cfg.distill)
        # the gate: 10 wait for the teacher, the one with an empty subject is quarantined for that alone
        assert (checked.n_read, checked.n_accepted, checked.n_quarantined, checked.n_unlabelled) == (31, 20, 1, 10)
        assert checked.reconciles
        done = distill(checked, champion_api(), cfg, tmp_path / "home", tmp_path / "run")
        s = done.distilled
        assert (s.n_to_answer, s.n_answered, s.n_called, s.n_cached, s.n_quarantined) == (10, 10, 10, 0, 0)
        assert len(completions(fake)) == 10 and {json.loads(r[3])["model"] for r in completions(fake)} == {FT}
        # the prompt sent is the record's system + user turns, no answer
        sent = json.loads(completions(fake)[0][3])["messages"]
        assert [m["role"] for m in sent] == ["system", "user"] and "Subject:" in sent[1]["content"]
        assert 0 < s.estimated_cost_usd < 0.01  # 10 prompts in + 10 x 256 tokens out at gpt-4o-mini's FT prices
        assert (done.n_read, done.n_accepted, done.n_quarantined, done.n_unlabelled) == (31, 30, 1, 0)
        rows = [ChatExample.model_validate_json(line) for line in done.accepted_path.read_bytes().splitlines()]
        taught = [r for r in rows if r.answered_by]
        assert len(taught) == 10 and {r.answered_by for r in taught} == {f"champion v3 ({FT})"}
        assert {r.label for r in taught} == {"billing"} and taught[0].messages[-1]["content"] == TEACHER
        assert all(r.answered_by is None for r in rows if r not in taught)
        golden = [json.loads(line) for line in s.answers_path.read_text().splitlines()]
        assert len(golden) == 10 and golden[0]["answer"] == TEACHER and golden[0]["teacher_model"] == f"openai:{FT}"

        # the same records again (a rerun that lost its ledger, another run folder): nothing is paid twice
        again = gate_folder(landing(tmp_path / "again"), cfg, tmp_path / "run2", cfg.distill)
        redone = distill(again, champion_api(), cfg, tmp_path / "home", tmp_path / "run2")
        assert (redone.distilled.n_called, redone.distilled.n_cached) == (0, 10) and len(completions(fake)) == 10
        assert redone.distilled.estimated_cost_usd == 0.0
        assert not any(KEY.encode() in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_over_budget_nothing_is_sent_and_a_stopped_run_resumes_without_paying_twice(tmp_path, key):
    calls = []

    def answer(model, messages):
        calls.append(model)
        if len(calls) == 6:  # the 7th request on fails: the run stops in its second batch
            fake.faults.extend(Fault("POST", "/v1/chat/completions", 400) for _ in range(20))
        return TEACHER

    with FakeOpenAI(answer=answer) as fake:
        poor = api_config(fake, "train.max_cost_usd=0.0001")
        checked = gate_folder(landing(tmp_path), poor, tmp_path / "run", poor.distill)
        with pytest.raises(TuneloopError, match=r"teacher .* answering 10 records would cost up to \$0\.00.*nothing was sent"):
            distill(checked, champion_api(), poor, tmp_path / "home", tmp_path / "run")
        assert completions(fake) == []

        cfg = api_config(fake)
        with pytest.raises(TuneloopError, match="chat.completions"):
            distill(checked, champion_api(), cfg, tmp_path / "home", tmp_path / "run")
        assert len(calls) == 6  # batch 1 (4) kept, batch 2 stopped after 2
        fake.faults.clear()
        done = distill(checked, champion_api(), cfg, tmp_path / "home", tmp_path / "run")
        assert (done.distilled.n_cached, done.distilled.n_called) == (4, 6) and len(calls) == 12
        assert done.n_accepted == 30


def test_a_teacher_answer_without_a_label_is_quarantined_with_the_reason_and_no_champion_quarantines_all(
        tmp_path, key):
    replies = iter(["queue: login\nReset it here.", "I am not sure."] * 4 + ["queue: login\x03\x1d", "\ufffd"])
    with FakeOpenAI(answer=lambda model, messages: next(replies)) as fake:
        cfg = api_config(fake)
        checked = gate_folder(landing(tmp_path), cfg, tmp_path / "run", cfg.distill)
        done = distill(checked, champion_api(), cfg, tmp_path / "home", tmp_path / "run")
        assert (done.distilled.n_answered, done.distilled.n_quarantined) == (4, 6)
        assert done.n_accepted + done.n_quarantined + done.n_duplicates == done.n_read
        reasons = [orjson.loads(line)["reasons"][0] for line in done.quarantine_path.read_bytes().splitlines()]
        assert sum(r.startswith("teacher_answer_unlabelled:") and "'I am not sure.'" in r for r in reasons) == 4
        assert sum(r.startswith("teacher_answer_garbled:") for r in reasons) == 2

    nobody = gate_folder(landing(tmp_path / "b"), cfg, tmp_path / "run-b", cfg.distill)
    done = distill(nobody, None, cfg, tmp_path / "home", tmp_path / "run-b")
    assert (done.n_accepted, done.n_quarantined, done.n_unlabelled) == (20, 11, 0)
    assert b"no_teacher:" in done.quarantine_path.read_bytes()


def test_migrate_means_local_backend_champion_teacher_and_a_tie_promotes():
    from tuneloop.core.records import EvalReport, ModelScore
    from tuneloop.lib.promotion import decide_promotion

    cfg = load_config(DEMO_CONFIG, ["train.backend=openai"])
    moved = migration_config(cfg)
    assert (moved.train.backend, moved.distill.teacher, moved.registry.promote_when) == (
        "local", "champion", "at_least_as_good")
    tie = EvalReport(n_examples=10, base=ModelScore(n_examples=10, accuracy=0.1, macro_f1=0.1),
                     candidate=ModelScore(n_examples=10, accuracy=0.5, macro_f1=0.5),
                     champion=ModelScore(n_examples=10, accuracy=0.5, macro_f1=0.5), predictions_path="p")
    assert not decide_promotion(tie, cfg.evaluate, cfg.registry, has_champion=True).promoted
    decision = decide_promotion(tie, moved.evaluate, moved.registry, has_champion=True)
    assert decision.promoted and "matches or beats champion" in decision.reason


def test_a_strangers_chats_ending_with_the_user_are_answered_for_a_generation_task(tmp_path, key):
    """Not the demo: a messages column, free-text answers (no labels), other ids. A chat that ends with the
    user is the teacher's; one that ends with an answer is kept as written."""
    cfg_file = stranger_config(tmp_path, "chat_id", "{id: chat_id, messages: conversation}")
    asked = [{"role": "system", "content": "You answer questions about the Mondragon garden."},
             {"role": "user", "content": "When do the roses flower?"}]
    with FakeOpenAI(answer=lambda model, messages: "From late May to July.") as fake:
        cfg = load_config(cfg_file, [
            "distill.teacher=champion", f"train.openai.base_url={fake.base_url}", "train.openai.provider=compatible"])
        write_lines(tmp_path / "in" / "chats.jsonl", [
            json.dumps({"chat_id": "a", "conversation": asked}),
            json.dumps({"chat_id": "b", "conversation": [{"role": "user", "content": "Is the cafe open on Mondays?"},
                                                         {"role": "assistant", "content": "No, Tuesday to Sunday."}]}),
            json.dumps({"chat_id": "c", "conversation": json.dumps([{"role": "user", "content": "Dogs allowed?"}])}),
            json.dumps({"chat_id": "d", "conversation": [{"role": "wizard", "content": "x"}, {"role": "user", "content": ""}]})])
        checked = gate_folder(tmp_path / "in", cfg, tmp_path / "run", cfg.distill)
        assert (checked.n_accepted, checked.n_unlabelled, checked.n_quarantined) == (1, 2, 1)
        assert orjson.loads(checked.quarantine_path.read_bytes())["reasons"] == ["prompt:n_unknown_roles",
                                                                                 "prompt:n_empty_content"]
        done = distill(checked, champion_api(), cfg, tmp_path / "home", tmp_path / "run")
        assert asked in [json.loads(r[3])["messages"] for r in completions(fake)] and len(completions(fake)) == 2
    rows = {r.record_id: r for r in map(ChatExample.model_validate_json, done.accepted_path.read_bytes().splitlines())}
    assert rows["a"].messages == [*asked, {"role": "assistant", "content": "From late May to July."}]
    assert rows["a"].label is None and rows["a"].answered_by == f"champion v3 ({FT})"
    assert rows["b"].answered_by is None and rows["c"].messages[-1]["content"] == "From late May to July."
    assert done.reconciles and done.n_accepted == 3 and done.n_read == 4
