"""Command templates and item parsing: items are data, substituted per argument."""

from __future__ import annotations

import pytest

from kiabatch import items, templates
from kiabatch.errors import UsageError


def render(command, item):
    return templates.fill(command, item, input_path="/t/in.json", output_path="/t/out", index=4)


def test_placeholders_are_substituted_per_argument():
    argv = render(["prog", "--url={url}", "{item}", "{input}", "{output}", "{index}", "{{x}}"], {"url": "u v"})
    assert argv == ["prog", "--url=u v", '{"url":"u v"}', "/t/in.json", "/t/out", "4", "{x}"]


def test_string_items_pass_as_is_and_other_values_as_compact_json():
    assert render(["p", "{item}"], "a b") == ["p", "a b"]
    assert render(["p", "{item}"], [1, {"k": None}]) == ["p", '[1,{"k":null}]']
    assert render(["p", "{n}"], {"n": 5}) == ["p", "5"]


def test_shell_metacharacters_stay_inside_one_argument():
    hostile = "$(touch pwned); rm -rf ~ ' \" ; | `id` \n next"
    assert render(["p", "{item}"], hostile) == ["p", hostile]


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ([], "command is empty"),
        (["p", "{"], "unmatched or empty brace"),
        (["p", "{}"], "unmatched or empty brace"),
        (["p", "a}b"], "unmatched or empty brace"),
    ],
)
def test_malformed_templates_are_refused(command, message):
    with pytest.raises(UsageError, match=message):
        templates.validate(command)


def test_a_missing_field_names_the_item_and_the_field():
    with pytest.raises(UsageError, match="has no field 'url'"):
        templates.check_items(["p", "{url}"], [{"url": 1}, {"uri": 2}])
    with pytest.raises(UsageError, match="is not a JSON object"):
        templates.check_items(["p", "{url}"], ["plain"])


def test_item_parsing_names_where_the_bad_json_is():
    assert items.parse('{"a": 1}') == {"a": 1}
    with pytest.raises(UsageError, match=r"malformed item JSON in --item: Expecting value"):
        items.parse("hello")
    with pytest.raises(UsageError, match="not a finite number"):
        items.parse("NaN")


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('1\n\n"two"\n{broken\n')
    with pytest.raises(UsageError, match=r"items.jsonl line 4"):
        items.read_jsonl(path)


def test_the_fast_item_encoder_matches_the_general_one():
    values = [
        0,
        -7,
        10**30,
        "plain",
        'quo"te\\',
        "tab\tnew\nline\x01",
        "ünï ✓",
        1.5,
        True,
        None,
        [1, "a"],
        {"k": [None, False]},
    ]
    assert list(items.encode_many(values)) == [items.encode(v).encode() for v in values]
    assert [items.decode(t) for t in items.encode_many(values)] == values
