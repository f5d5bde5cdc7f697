"""swift_format.py: ms-swift's embedding rows (issue 27) read into the Records a plain list says, mixed
modalities in one file, several positives sharing a label, and bad rows named by file:line."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from vembed_blocks.data.records import Item, Record, RecordError, load_records, read_records


def _user(content):
    return {"role": "user", "content": content}


ROWS = [
    # text only, with a system instruction and a hard negative
    {
        "messages": [{"role": "system", "content": "Find the answer."}, _user("what is a cat?")],
        "positive_messages": [[_user("a small feline")]],
        "negative_messages": [[_user("a large canine")]],
    },
    # image only query, two positives (one image+text, one text), two negatives, ms-swift's 0/1 pair label
    {
        "messages": [_user("<image>")],
        "images": ["a.jpg"],
        "positive_messages": [[_user("<image> a red square ")], [_user("red")]],
        "positive_images": [["b.jpg"], []],
        "negative_messages": [[_user("<image><image>two blues")], [{"role": "system", "content": "Doc:"}, _user("x")]],
        "negative_images": [["b.jpg", "sub/c.png"], []],
        "label": 1,
    },
    # image+text query, two positives and no label: the row's position is their shared label
    {
        "messages": [_user("same <image> as this")],
        "images": ["sub/c.png"],
        "positive_messages": [[_user("p1")], [_user("<image>")]],
        "positive_images": [[], ["a.jpg"]],
        "id": 7,
    },
]


@pytest.fixture
def d(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.jpg", "b.jpg", "sub/c.png"):
        Image.new("RGB", (8, 6), (255, 0, 0)).save(tmp_path / name)
    return tmp_path


def _jsonl(d, rows, name="swift.jsonl"):
    path = d / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _expected(d, path):
    a, b, c = (str(d / n) for n in ("a.jpg", "b.jpg", "sub/c.png"))
    cat = Item(text="what is a cat?")
    red_negs = [Item(text="two blues", images=(b, c)), Item(text="Doc: x")]
    return [
        Record(cat, Item(text="a small feline"), [Item(text="a large canine")], None, None, "swift",
               {"instruction": "Find the answer."}, f"{path}:1"),
        Record(Item(images=(a,)), Item(text="a red square", images=(b,)), red_negs, f"{path}:2#q", None, "swift",
               {"swift_label": 1}, f"{path}:2"),
        Record(Item(images=(a,)), Item(text="red"), red_negs, f"{path}:2#q", None, "swift", {"swift_label": 1},
               f"{path}:2"),
        Record(Item(text="same as this", images=(c,)), Item(text="p1"), [], f"{path}:3#q", None, "swift",
               {"id": 7}, f"{path}:3"),
        Record(Item(text="same as this", images=(c,)), Item(images=(a,)), [], f"{path}:3#q", None, "swift",
               {"id": 7}, f"{path}:3"),
    ]  # fmt: skip


def test_mixed_rows_read_to_the_expected_records(d):
    path = _jsonl(d, ROWS)
    assert list(read_records(path)) == _expected(d, path)
    # random access re-parses the line and picks the same positive
    assert list(load_records(path)) == _expected(d, path)


def test_parquet_rows_read_the_same(d):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = str(d / "swift.parquet")
    # every row names every column (from_pylist takes the columns from the first row); "id" is left out
    keys = sorted({k for r in ROWS for k in r} - {"id"})
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in ROWS]), path)
    expected = _expected(d, path)
    for rec in expected:
        rec.extra.pop("id", None)
    assert load_records(path) == expected


@pytest.mark.parametrize(
    "change, message",
    [
        ({"images": []}, r"'messages' has 1 <image> tag\(s\) but 0 image path\(s\)"),
        ({"positive_images": [["b.jpg"], ["a.jpg"]]}, r"'positive_messages\[1\]' has 0 <image> tag\(s\) but 1 image"),
        ({"negative_images": [["b.jpg"], []]}, r"'negative_messages\[0\]' has 2 <image> tag\(s\) but 1 image"),
        ({"positive_images": [["b.jpg"]]}, r"'positive_images' must hold one list of paths per conversation"),
        ({"messages": None}, r"missing field 'messages'"),
        ({"positive_messages": "red"}, r"'positive_messages' must be a list of conversations, got str"),
        ({"positive_messages": []}, r"'positive_messages' is empty"),
        (
            {"messages": [_user("<image>"), {"role": "assistant", "content": "x"}]},
            r"'messages': a turn's role must be 'system' or 'user', got 'assistant'",
        ),
        ({"images": ["missing.jpg"]}, r"field 'images': image file not found"),
    ],
)
def test_bad_rows_name_file_line_and_message(d, change, message):
    path = _jsonl(d, [ROWS[0], {**ROWS[1], **change}])
    with pytest.raises(RecordError, match=re.escape(path) + ":2: " + message):
        list(read_records(path))


def test_skip_bad_counts_a_bad_row_and_keeps_the_rest(d):
    path = _jsonl(d, [ROWS[0], {**ROWS[1], "images": []}, ROWS[2]])
    reader = read_records(path, skip_bad=True)
    assert [r.source for r in reader] == [f"{path}:1", f"{path}:3", f"{path}:3"] and reader.skipped == 1


def test_text_around_a_tag_is_joined_by_one_space(tmp_path):
    row = {
        "messages": [_user("a red <image> cat<image>sat")],
        "images": ["a.png", "b.png"],
        "positive_messages": [[_user("x")]],
    }
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (path := tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    (record,) = list(read_records(str(path)))
    assert record.query.text == "a red cat sat"
