"""records.py / images.py: every format parses to the expected Record; bad rows fail loudly or are counted."""

from __future__ import annotations

import json
import logging
import os
import sys

import pytest
from PIL import Image

from vembed_blocks.data.images import ImageLoadError, load_image
from vembed_blocks.data.records import Item, RecordError, load_records, read_records


def _img(path, size=(8, 6), color=(255, 0, 0)):
    Image.new("RGB", size, color).save(path)
    return str(path)


@pytest.fixture
def d(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.png", "s1.png", "s2.png", "t.png"):
        _img(tmp_path / name)
    return tmp_path


def _jsonl(d, rows, name="data.jsonl"):
    path = d / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_every_pair_format(d):
    p = _jsonl(
        d,
        [
            {"query": "a red cat", "positive": "a.jpg", "negatives": ["b.jpg", "c.png"], "label": 3},
            {"query": "a dog", "positive": "b.jpg"},
        ],
        "t2i.jsonl",
    )
    r1, r2 = list(read_records(p))
    assert r1.format == "t2i" and r1.query == Item(text="a red cat")
    assert r1.positive == Item(images=(str(d / "a.jpg"),))
    assert r1.negatives == [Item(images=(str(d / "b.jpg"),)), Item(images=(str(d / "c.png"),))]
    assert r1.label == 3 and r1.source == f"{p}:1"
    assert r2.negatives == [] and r2.label is None and r2.source == f"{p}:2"

    i2i = list(
        read_records(
            _jsonl(d, [{"query_image": "a.jpg", "positive": "b.JPG".lower(), "negatives": ["c.png"]}], "i2i.jsonl")
        )
    )[0]
    assert (
        i2i.format == "i2i"
        and i2i.query == Item(images=(str(d / "a.jpg"),))
        and i2i.positive.images == (str(d / "b.jpg"),)
    )

    i2t = list(
        read_records(
            _jsonl(d, [{"query_image": "a.jpg", "positive": "a red square", "negatives": ["blue"]}], "i2t.jsonl")
        )
    )[0]
    assert i2t.format == "i2t" and i2t.positive == Item(text="a red square") and i2t.negatives == [Item(text="blue")]

    m2i = list(
        read_records(_jsonl(d, [{"query_image": "a.jpg", "query": "make it blue", "positive": "b.jpg"}], "m2i.jsonl"))
    )[0]
    assert m2i.format == "m2i" and m2i.query == Item(text="make it blue", images=(str(d / "a.jpg"),))

    t2t = list(
        read_records(
            _jsonl(
                d,
                [{"query": "q", "positive": "p", "negatives": ["n1", "n2"], "task": "nli", "score": 0.5}],
                "t2t.jsonl",
            )
        )
    )[0]
    assert t2t.format == "t2t" and t2t.positive == Item(text="p") and [n.text for n in t2t.negatives] == ["n1", "n2"]
    assert t2t.task == "nli" and t2t.extra == {"score": 0.5}


def test_declared_format_and_column_mapping(d):
    os.rename(d / "a.jpg", d / "img_without_ext")
    p = _jsonl(d, [{"caption": "a cat", "img": "img_without_ext"}])
    # Without a declared format a path with no image extension is text (the documented rule) ...
    (r,) = read_records(p, columns={"query": "caption", "positive": "img"})
    assert r.format == "t2t" and r.positive == Item(text="img_without_ext")
    # ... and declaring the format makes it an image.
    (r,) = read_records(p, columns={"query": "caption", "positive": "img"}, format="t2i", task="coco")
    assert r.positive == Item(images=(str(d / "img_without_ext"),)) and r.task == "coco"


def test_edit_format(d):
    rows = [
        {
            "source_image": "s1.png",
            "target_image": "t.png",
            "instruction": "make sunset",
            "instruction_cn": "日落",
            "inverse_instruction": "a blue sky",
            "inverse_instruction_cn": "蓝天",
        },
        {
            "source_image": ["s1.png", "s2.png"],
            "target_image": "t.png",
            "instruction": "merge",
            "instruction_cn": "合并",
        },
        {"source_image": None, "target_image": "t.png", "instruction": "a cat", "instruction_cn": "猫"},
    ]
    p = _jsonl(d, rows)
    recs = list(read_records(p))
    assert [r.source.rsplit(":", 1)[1] for r in recs] == ["1", "1", "2", "3"]
    fwd, inv, multi, t2i = recs
    s1, s2, t = (str(d / n) for n in ("s1.png", "s2.png", "t.png"))
    assert fwd.query == Item(text="make sunset", images=(s1,)) and fwd.positive == Item(images=(t,))
    assert inv.query == Item(text="a blue sky", images=(t,)) and inv.positive == Item(images=(s1,))
    assert inv.extra == {"num_source_images": 1, "inverse": True}
    assert multi.query.images == (s1, s2) and multi.extra["num_source_images"] == 2
    assert t2i.query == Item(text="a cat") and t2i.extra["num_source_images"] == 0

    cn = list(read_records(p, inverse=False, language="cn"))
    assert [r.query.text for r in cn] == ["日落", "合并", "猫"]
    t2i_mode = list(read_records(p, t2i_mode=True))
    assert [r.query for r in t2i_mode] == [Item(text="make sunset"), Item(text="merge"), Item(text="a cat")]


def test_edit_row_without_instruction_reads_it_as_empty(d):
    # Seed 004: "treated as empty string if missing"; the source images still make a query.
    p = _jsonl(
        d,
        [
            {"source_image": "s1.png", "target_image": "t.png", "inverse_instruction": "a blue sky"},
            {"source_image": ["s1.png", "s2.png"], "target_image": "t.png", "instruction": "   "},
        ],
    )
    s1, s2, t = (str(d / n) for n in ("s1.png", "s2.png", "t.png"))
    fwd, inv, multi = read_records(p)
    assert fwd.query == Item(text="", images=(s1,)) and fwd.positive == Item(images=(t,))
    assert inv.query == Item(text="a blue sky", images=(t,)) and inv.positive == Item(images=(s1,))
    assert multi.query == Item(text="", images=(s1, s2))
    assert [r.query.text for r in read_records(p, language="cn", inverse=False)] == ["", ""]
    # With t2i_mode the sources are dropped, so the query would be empty: refused, not silently kept.
    with pytest.raises(
        RecordError, match=r"data.jsonl:1: no 'instruction' and no source image \(t2i_mode drops them\)"
    ):
        list(read_records(p, t2i_mode=True))


def test_files_with_a_utf8_bom(d):
    # Excel's "CSV UTF-8" (and some editors' JSONL) start with EF BB BF; the header must not become "\ufeffquery".
    csv_path, jsonl_path = d / "bom.csv", d / "bom.jsonl"
    csv_path.write_bytes(b"\xef\xbb\xbfquery,positive\r\na cat,a.jpg\r\na dog,b.jpg\r\n")
    jsonl_path.write_bytes(
        b'\xef\xbb\xbf{"query": "a cat", "positive": "a.jpg"}\n{"query": "a dog", "positive": "b.jpg"}\n'
    )
    for path in (csv_path, jsonl_path):
        recs = list(read_records(path))
        assert [r.query for r in recs] == [Item(text="a cat"), Item(text="a dog")]
        assert [r.positive for r in recs] == [Item(images=(str(d / "a.jpg"),)), Item(images=(str(d / "b.jpg"),))]
    assert [r.source for r in load_records(jsonl_path)] == [f"{jsonl_path}:1", f"{jsonl_path}:2"]
    assert load_records(jsonl_path)[0].query == Item(text="a cat")  # random access re-reads line 1, BOM included


def test_csv_undecodable_bytes_name_the_line_and_can_be_skipped(d, caplog):
    path = d / "latin1.csv"
    path.write_bytes(b"query,positive\na cat,a.jpg\ncaf\xe9 au lait,b.jpg\na dog,c.png\n")  # 0xE9 is latin-1 "e acute"
    with pytest.raises(RecordError) as err:
        list(read_records(path))
    assert str(err.value) == f"{path}:3: invalid UTF-8 in column 'query': b'caf\\xe9 au lait'; save the file as UTF-8"
    with caplog.at_level(logging.WARNING):
        reader = read_records(path, skip_bad=True)
        recs = list(reader)
    assert [(r.query.text, r.source) for r in recs] == [("a cat", f"{path}:2"), ("a dog", f"{path}:4")]
    assert recs[1].positive == Item(images=(str(d / "c.png"),))
    assert reader.skipped == 1 and reader.rows == 3 and "skipped 1 of 3 rows" in caplog.text


def test_csv(d):
    path = d / "data.csv"
    path.write_text('query,positive,negatives,label\na cat,a.jpg,"[""b.jpg""]",1\na dog,b.jpg,,2\n', encoding="utf-8")
    r1, r2 = read_records(str(path))
    assert r1.positive.images == (str(d / "a.jpg"),) and r1.negatives == [Item(images=(str(d / "b.jpg"),))]
    assert r1.label == "1" and r1.source == f"{path}:2"
    assert r2.negatives == [] and r2.source == f"{path}:3"


def test_parquet_needs_extra(d, monkeypatch):
    # Runs whether or not the extra is installed: a None entry in sys.modules makes the import fail.
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"pip install vembed-blocks\[parquet\]"):
        list(read_records(str(d / "x.parquet")))


def _corrupt(d):
    (d / "trunc.jpg").write_bytes((d / "a.jpg").read_bytes()[:40])  # a JPEG cut off mid-stream
    (d / "junk.png").write_bytes(b"not an image at all")


# (row as written on line 2, expected message fragment); line 1 and 3 are good rows.
BAD = [
    ('{"query": "a cat", "positive": ', "malformed JSON"),
    ({"query": "a cat"}, "missing field 'positive'"),
    ({"caption": "a cat", "image": "a.jpg"}, "unknown format"),
    ({"query": "a cat", "positive": "missing.jpg"}, "image file not found"),
    ({"query": "a cat", "positive": "trunc.jpg"}, "cannot load image"),
    ({"query": "a cat", "positive": "junk.png"}, "cannot load image"),
    ({"query": "   ", "positive": "a.jpg"}, "empty text in field 'query'"),
    ({"query": "", "positive": "a.jpg"}, "empty text in field 'query'"),
    ({"query": "a cat", "positive": ""}, "empty text in field 'positive'"),
    ({"query": "a cat", "positive": "a.jpg", "negatives": "b.jpg"}, "'negatives' must be a list"),
    ({"query": "a cat", "positive": "a red cat"}, "format 't2t' differs"),
    ({"query_image": "a.jpg"}, "missing field 'positive'"),
    ({"source_image": None, "target_image": "t.png"}, "no 'instruction' and no source image: the query would be empty"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[m for _, m in BAD])
def test_bad_rows_fail_with_file_line_or_are_counted(d, bad, message, caplog):
    _corrupt(d)
    good = {"query": "a dog", "positive": "b.jpg"}
    p = _jsonl(d, [good, bad, good])
    with pytest.raises(RecordError, match=message) as err:
        list(read_records(p, verify_images=True))
    assert str(err.value).startswith(f"{p}:2: ")
    with caplog.at_level(logging.WARNING):
        reader = read_records(p, skip_bad=True, verify_images=True)
        recs = list(reader)
    assert [r.source for r in recs] == [f"{p}:1", f"{p}:3"]
    assert reader.skipped == 1 and reader.rows == 3
    assert "skipped 1 of 3 rows" in caplog.text and message in caplog.text


def test_streaming_reads_lazily(d):
    # A file whose tail is garbage: the first record arrives before the bad line is ever read.
    p = _jsonl(d, [{"query": "q", "positive": "p"}] + ["{bad"] * 3)
    reader = read_records(p)
    assert next(reader).query.text == "q" and reader.rows == 1


def test_load_image_orientation_rgb_cap_and_errors(d):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored 40x20 shows as 20x40
    img.save(d / "rot.jpg", exif=exif)
    assert load_image(str(d / "rot.jpg")).size == (20, 40)
    assert load_image(str(d / "rot.jpg"), max_side=10).size == (5, 10)
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(d / "clear.png")
    rgb = load_image(str(d / "clear.png"))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255)
    Image.new("L", (4, 4), 7).save(d / "gray.png")
    assert load_image(str(d / "gray.png")).getpixel((1, 1)) == (7, 7, 7)
    _corrupt(d)
    for name, reason in (
        ("trunc.jpg", "truncated|OSError"),
        ("junk.png", "cannot identify"),
        ("nope.png", "file not found"),
    ):
        with pytest.raises(ImageLoadError, match=rf"^data.jsonl:7: cannot load image .*{name}: .*({reason})"):
            load_image(str(d / name), source="data.jsonl:7")


def test_indexed_records_random_access_matches_streaming(d):
    import pickle

    from vembed_blocks.data.records import IndexedRecords

    rows = [
        {"source_image": "s1.png", "target_image": "t.png", "instruction": "a", "inverse_instruction": "b"},
        "{broken",
        {"source_image": ["s1.png", "s2.png"], "target_image": "t.png", "instruction": "c"},
        {"source_image": "s2.png", "target_image": "t.png", "instruction": "d", "inverse_instruction": "e"},
    ]
    p = _jsonl(d, rows)
    idx = IndexedRecords(p, skip_bad=True)
    assert len(idx) == 5 and idx.reader.skipped == 1
    assert idx.groups.tolist() == [1, 1, 2, 1, 1]
    streamed = list(read_records(p, skip_bad=True))
    assert [idx[i] for i in range(len(idx))] == streamed
    assert [r.query.text for r in streamed] == ["a", "b", "c", "d", "e"]
    clone = pickle.loads(pickle.dumps(idx))  # DataLoader workers started with spawn receive a pickled copy
    assert clone[4] == streamed[4]


def test_load_records_random_access_for_jsonl_and_csv(tmp_path):
    from vembed_blocks.data.records import IndexedRecords, load_records

    (tmp_path / "d.jsonl").write_text(
        '{"query": "a cat", "positive": "a pet"}\n{"query": "a dog", "positive": "a hound"}\n'
    )
    (tmp_path / "d.csv").write_text("query,positive\na cat,a pet\na dog,a hound\n")
    jsonl, csv_ = load_records(tmp_path / "d.jsonl", format="t2t"), load_records(tmp_path / "d.csv", format="t2t")
    assert isinstance(jsonl, IndexedRecords) and isinstance(csv_, list)
    assert (
        [(r.query.text, r.positive.text) for r in jsonl]
        == [(r.query.text, r.positive.text) for r in csv_]
        == [("a cat", "a pet"), ("a dog", "a hound")]
    )
    assert jsonl[1].positive.text == "a hound"


def test_labels_are_ints_or_strings_in_jsonl_csv_and_parquet(d):
    # JSONL: ints and strings kept; a null, NaN (pandas' gap), a blank string and a missing key mean "no label".
    rows = [{"query": f"q{i}", "positive": "p"} for i in range(6)]
    for row, label in zip(rows, (3, "cat", None, float("nan"), "  ")):
        row["label"] = label
    path = _jsonl(d, rows)  # json.dumps writes the float NaN as the bare token NaN, as pandas users get it
    assert [r.label for r in read_records(path, format="t2t")] == [3, "cat", None, None, None, None]
    # CSV cells are strings: "1.0" is the string label "1.0"; an empty cell is no label.
    path = d / "labels.csv"
    path.write_text("query,positive,label\na,p,1.0\nb,p,7\nc,p,\n", encoding="utf-8")
    assert [r.label for r in read_records(path, format="t2t")] == ["1.0", "7", None]


def test_parquet_labels_null_is_no_label_and_a_float_is_an_error(d):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    text = {"query": ["a", "b", "c"], "positive": ["p", "p", "p"]}
    ints = d / "ints.parquet"
    pq.write_table(pa.table({**text, "label": pa.array([1, None, 2], pa.int64())}), ints)
    assert [r.label for r in read_records(ints, format="t2t")] == [1, None, 2]
    # What pandas writes for an int column with a gap: float64 with NaN for the gap.
    floats = d / "floats.parquet"
    pq.write_table(pa.table({**text, "label": pa.array([float("nan"), 1.0, float("nan")], pa.float64())}), floats)
    with pytest.raises(RecordError) as err:
        list(read_records(floats, format="t2t"))
    want = 'label must be an int or a string, got float 1.0 (write 1, or "1.0" as a string label)'
    assert str(err.value) == f"{floats}:2: {want}"
    reader = read_records(floats, skip_bad=True, format="t2t")
    assert [(r.query.text, r.label) for r in reader] == [("a", None), ("c", None)] and reader.skipped == 1


# (label as written on line 2 of a JSONL file, the error after "file:2: label must be an int or a string, got ")
BAD_LABELS = [
    ("1.0", 'float 1.0 (write 1, or "1.0" as a string label)'),
    ("0.5", 'float 0.5 (write "0.5" as a string label; a gold score for CoSENT goes in a "score" field)'),
    ('{"x": 1}', "dict {'x': 1}"),
    ("[1, 2]", "list [1, 2]"),
    ("true", "bool True"),
]


@pytest.mark.parametrize("label,got", BAD_LABELS, ids=[label for label, _ in BAD_LABELS])
def test_bad_labels_fail_with_file_line_or_are_counted(d, label, got, caplog):
    good = '{"query": "q1", "positive": "p", "label": %s}'
    p = _jsonl(d, [good % "1", good % label, good % '"x"'])
    message = f"{p}:2: label must be an int or a string, got {got}"
    with pytest.raises(RecordError) as err:
        list(read_records(p, format="t2t"))
    assert str(err.value) == message
    with caplog.at_level(logging.WARNING):
        reader = read_records(p, skip_bad=True, format="t2t")
        recs = list(reader)
    assert [(r.source, r.label) for r in recs] == [(f"{p}:1", 1), (f"{p}:3", "x")]
    assert reader.skipped == 1 and reader.rows == 3 and message in caplog.text
