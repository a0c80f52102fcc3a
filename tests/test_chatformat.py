"""Format validation, line by line, on a file with one planted error per line."""

import json

from tuneloop.lib.chatformat import example_errors, validate_chat_file

OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
CALL = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{\"id\": 1}"}}

PLANTED = [  # (line, expected codes)
    ("[1, 2]", ["data_type"]),
    ('{"messages": []}', ["missing_messages_list"]),
    ('{"prompt": "x", "completion": "y"}', ["example_unrecognized_key", "missing_messages_list"]),
    (json.dumps({"messages": [{"content": "no role"}, {"role": "assistant", "content": "a"}]}),
     ["message_missing_key", "unrecognized_role"]),
    (json.dumps({"messages": [{"role": "user", "content": "q", "extra": 1}, {"role": "assistant", "content": "a"}]}),
     ["message_unrecognized_key"]),
    (json.dumps({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}),
     ["unrecognized_role"]),
    (json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}),
     ["missing_content"]),
    (json.dumps({"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "a"}]}),
     ["missing_content"]),
    (json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}),
     ["example_missing_assistant_message"]),
    (json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}),
     ["last_message_not_assistant"]),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]}),
     ["invalid_weight"]),
    (json.dumps({"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]}),
     ["invalid_weight"]),
    (json.dumps({"messages": [{"role": "user", "content": "q"},
                              {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
                              {"role": "assistant", "content": "a"}]}), ["invalid_tool_calls"]),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r", "tool_call_id": "zz"},
                              {"role": "assistant", "content": "a"}]}), ["invalid_tool_message"]),
    (json.dumps({"tools": [{"type": "function"}], **OK}), ["invalid_tools"]),
    ('{"messages": [', ["invalid_json"]),
]

VALID = [
    OK,
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0},
                  {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b", "weight": 1}]},
    {"tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}],
     "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                  {"role": "tool", "content": "{\"ok\": true}", "tool_call_id": "c1"},
                  {"role": "assistant", "content": "done", "name": "bot"}]},
]


def test_each_planted_error_is_reported_on_its_line_with_its_code(tmp_path):
    path = tmp_path / "planted.jsonl"
    path.write_text("\n".join([json.dumps(v) for v in VALID] + [line for line, _ in PLANTED]) + "\n")
    report = validate_chat_file(path)
    expected = {len(VALID) + i + 1: codes for i, (_, codes) in enumerate(PLANTED)}
    assert report.line_codes == expected
    assert report.n_examples == len(VALID) + len(PLANTED)
    assert report.counts["missing_content"] == 2 and report.counts["invalid_weight"] == 2
    assert not report.ok and report.file_codes == []


def test_valid_examples_have_no_codes_and_a_numeric_weight_does_not_crash():
    for example in VALID:
        assert example_errors(example) == [], example
    assert example_errors({"messages": [{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "a", "weight": 2.5}]}) == ["invalid_weight"]


def test_file_level_codes_and_too_many_tokens_is_a_warning(tmp_path):
    few = tmp_path / "few.jsonl"
    few.write_text(json.dumps(OK) + "\n")
    assert validate_chat_file(few).file_codes == ["too_few_examples"]

    long = {"messages": [{"role": "user", "content": "q " * 50}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "tokens.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in [OK] * 10 + [long]) + "\n")
    report = validate_chat_file(path, lambda exs: [sum(len(m["content"].split()) for m in ms) for ms in exs], 20)
    assert report.line_codes == {11: ["too_many_tokens"]}
    assert report.ok  # the service truncates: reported, not refused
    assert report.to_json()["lines_with_codes"] == [{"line": 11, "codes": ["too_many_tokens"]}]


def test_the_fast_path_never_passes_what_the_full_check_flags():
    """example_errors answers [] early for the common shape (lib/chatformat.py _plain); every variation
    of that shape must still get the full check's codes."""
    from tuneloop.lib import chatformat

    good = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    variants = [good, good[1:], [{"role": "developer", "content": "d"}, *good[1:]]]
    for i in range(len(good)):
        for key, value in [("content", ""), ("content", None), ("content", 3), ("content", ["x"]), ("role", "tool"),
                           ("role", "robot"), ("role", None), ("role", ["user"]), ("name", "n"), ("weight", 0), ("extra", 1)]:
            changed = [dict(m) for m in good]
            changed[i][key] = value
            variants.append(changed)
    variants += [good[:-1], [*good, {"role": "user", "content": "more"}], [*good[:-1], "text"], [], None,
                 [{"role": "assistant", "content": "a", "tool_calls": []}]]
    for messages in variants:
        for example in ({"messages": messages}, {"messages": messages, "tools": []}):
            fast = chatformat.example_errors(example)
            original = chatformat._plain
            chatformat._plain = lambda _m: False
            try:
                full = chatformat.example_errors(example)
            finally:
                chatformat._plain = original
            assert fast == full, (example, fast, full)
