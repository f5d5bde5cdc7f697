"""What users hand the loaders (issue 24): Excel's semicolon CSV, capitalised headers, a column mapping from
the flag, and a folder as the training path (its files logged; a validation file or mixed formats refused)."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from vembed_blocks.data.columns import parse_columns, parse_csv_delimiter
from vembed_blocks.data.listing import eval_split_word
from vembed_blocks.data.loader import training_batches
from vembed_blocks.data.records import RecordError, load_records, read_records
from vembed_blocks.user_errors import UserError

ROWS = [
    {"query": "a black cat; sleeping", "positive": "a.jpg", "negatives": ["b.jpg"], "label": "cat"},
    {"query": 'a "red" dog', "positive": "b.jpg", "negatives": [], "label": "dog"},
]
LOADER = dict(batch_size=2, seed=0, rank=0, world_size=1, num_workers=0)


def _images(folder):
    """``a.jpg`` and ``b.jpg`` in ``folder``, where the rows' relative paths resolve."""
    folder.mkdir(exist_ok=True)
    for name, colour in (("a.jpg", (255, 0, 0)), ("b.jpg", (0, 0, 255))):
        Image.new("RGB", (8, 8), colour).save(folder / name)
    return folder


@pytest.fixture
def d(tmp_path):
    return _images(tmp_path)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _same(records):
    """A record's content (``source`` names the file, so it differs between two files of the same rows)."""
    return [(r.query, r.positive, r.negatives, r.label, r.format) for r in records]


# ----------------------------------------------------------------------------- CSV as Excel writes it


def _excel_csv(path, header=("query", "positive", "negatives", "label"), delimiter=";"):
    """Excel's "CSV UTF-8" where the decimal mark is a comma: a BOM, ';' between fields, every field quoted
    (quotes doubled inside), CRLF line ends, list cells as JSON arrays."""
    quote = lambda v: '"' + str(v).replace('"', '""') + '"'
    lines = [delimiter.join(quote(h) for h in header)]
    for r in ROWS:
        cells = [r["query"], r["positive"], json.dumps(r["negatives"]) if r["negatives"] else "", r["label"]]
        lines.append(delimiter.join(quote(c) for c in cells))
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    return str(path)


def test_semicolon_csv_with_a_bom_reads_like_the_jsonl_and_says_so(d, caplog):
    csv_path, jsonl = _excel_csv(d / "excel.csv"), _jsonl(d / "same.jsonl", ROWS)
    with caplog.at_level(logging.INFO, logger="vembed_blocks.data"):
        records = list(read_records(csv_path))
    assert _same(records) == _same(read_records(jsonl))
    assert records[0].query.text == "a black cat; sleeping"  # a ';' inside a quoted cell stays text
    assert f"{csv_path}: columns separated by ';'" in caplog.messages
    assert [r.source for r in records] == [f"{csv_path}:2", f"{csv_path}:3"]
    # load_records (the recipes' evaluation) and a tab-separated file read the same
    assert _same(load_records(csv_path)) == _same(read_records(jsonl))
    assert _same(read_records(_excel_csv(d / "tabs.csv", delimiter="\t"))) == _same(read_records(jsonl))


def test_a_forced_delimiter_wins_and_a_wrong_one_names_the_fix(d, caplog):
    csv_path = _excel_csv(d / "excel.csv")
    with caplog.at_level(logging.INFO, logger="vembed_blocks.data"):
        assert len(list(read_records(csv_path, delimiter=";"))) == 2
    assert not any("columns separated" in m for m in caplog.messages)  # nothing sniffed: it was given
    with pytest.raises(RecordError) as err:
        list(read_records(csv_path, delimiter=","))
    assert str(err.value) == (
        f'{csv_path}:2: unknown format: row keys [\'query;"positive";"negatives";"label"\'] match none of '
        "('t2i', 'i2i', 'i2t', 'm2i', 't2t', 'edit', 'swift'); the row looks delimited by ';': pass --csv-delimiter ';'"
    )
    tabs = _excel_csv(d / "tabs.csv", delimiter="\t")
    assert len(list(read_records(tabs, delimiter="tab"))) == 2  # the flag's spelling of a tab
    with pytest.raises(RecordError, match=r"delimited by '\\t': pass --csv-delimiter tab$"):
        list(read_records(tabs, delimiter=","))


def test_a_comma_csv_is_read_as_before(d, caplog):
    path = d / "plain.csv"
    path.write_text('query,positive,label\n"a cat; sleeping",a.jpg,cat\n', encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="vembed_blocks.data"):
        (record,) = read_records(str(path))
    assert record.query.text == "a cat; sleeping" and record.label == "cat"
    assert caplog.messages == []


# ----------------------------------------------------------------------------- capitalised headers


def test_capitalised_headers_fail_with_the_exact_columns_flag(d):
    caps = _jsonl(d / "caps.jsonl", [{"Query": r["query"], "Positive": r["positive"]} for r in ROWS])
    with pytest.raises(RecordError) as err:
        list(read_records(caps))
    assert str(err.value) == (
        f"{caps}:1: unknown format: row keys ['Positive', 'Query'] match none of "
        "('t2i', 'i2i', 'i2t', 'm2i', 't2t', 'edit', 'swift'); the columns look capitalised: "
        "pass --columns query=Query,positive=Positive"
    )
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)  # old `except ValueError` works
    spaced = d / "spaced.csv"
    spaced.write_text("Query,Positive ,Hard Negatives\na cat,a.jpg,\n", encoding="utf-8")
    with pytest.raises(RecordError) as err:
        list(read_records(str(spaced)))
    assert str(err.value).endswith(
        "; the columns look capitalised and padded with spaces: pass --columns 'query=Query,positive=Positive '"
    )
    odd = _jsonl(d / "odd.jsonl", [{"caption": "a cat", "image": "a.jpg"}])
    with pytest.raises(RecordError) as err:
        list(read_records(odd))
    assert str(err.value).endswith("map them: --columns query=COLUMN,positive=COLUMN")


def test_the_column_mapping_loads_them_like_lowercase_headers(d):
    lower = _jsonl(d / "lower.jsonl", ROWS)
    upper = [
        {"Query": r["query"], "Positive": r["positive"], "Negatives": r["negatives"], "Label": r["label"]} for r in ROWS
    ]
    caps = _jsonl(d / "caps.jsonl", upper)
    columns = parse_columns("query=Query,positive=Positive,negatives=Negatives,label=Label")
    assert _same(read_records(caps, columns=columns)) == _same(read_records(lower))
    assert _same(load_records(caps, columns=columns)) == _same(load_records(lower))  # IndexedRecords
    excel = _excel_csv(d / "caps.csv", header=("Query", "Positive", "Negatives", "Label"))
    assert _same(load_records(excel, columns=columns, delimiter=";")) == _same(read_records(lower))


def test_training_batches_passes_columns_and_delimiter_to_the_file_reader(d):
    excel = _excel_csv(d / "caps.csv", header=("Query", "Positive", "Negatives", "Label"))
    columns = {"query": "Query", "positive": "Positive", "negatives": "Negatives", "label": "Label"}
    loader, rows = training_batches(excel, list, **LOADER, columns=columns, delimiter=";")
    (_, (batch,), _), *_ = loader.steps(1)
    assert rows == 2 and sorted(r.query.text for r in batch) == sorted(r["query"] for r in ROWS)
    with pytest.raises(RecordError, match="pass --columns query=Query,positive=Positive,negatives=Negatives,label=La"):
        training_batches(excel, list, **LOADER)


@pytest.mark.parametrize(
    "text,want",
    [
        ("query=Query,positive=Positive", {"query": "Query", "positive": "Positive"}),
        (" query = caption, positive=image_path", {"query": " caption", "positive": "image_path"}),
        ("positive=Positive ", {"positive": "Positive "}),  # a header's spaces are kept
        ("query_image=Photo,label=Class", {"query_image": "Photo", "label": "Class"}),
    ],
)
def test_parse_columns(text, want):
    assert parse_columns(text) == want


@pytest.mark.parametrize(
    "text,message",
    [
        ("query", "'query' is not FIELD=COLUMN"),
        ("query=Query,", "'' is not FIELD=COLUMN"),
        ("=Query", "'=Query' is not FIELD=COLUMN"),
        ("query= ", "'query= ' is not FIELD=COLUMN"),
        ("Query=Query", "unknown field 'Query'; the fields are query, query_image, positive, negatives, label, task,"),
        ("caption=text", "unknown field 'caption'"),
        ("query=a,query=b", "field 'query' is mapped twice"),
        ("query=a,positive=a", "column 'a' is mapped to two fields"),
    ],
)
def test_parse_columns_refuses(text, message):
    with pytest.raises(UserError) as err:
        parse_columns(text)
    assert message in str(err.value) and str(err.value).startswith(f"--columns {text!r}: ")


def test_parse_csv_delimiter():
    assert [parse_csv_delimiter(t) for t in (";", ",", "|", "tab", "\\t", "\t", "TAB")] == [";", ",", "|"] + ["\t"] * 4
    for bad in ("", ";;", '"'):
        with pytest.raises(UserError, match="give one character"):
            parse_csv_delimiter(bad)


# ----------------------------------------------------------------------------- a folder as the training path


def _t2i_rows(n, tag):
    return [{"query": f"{tag} caption {i}", "positive": "a.jpg"} for i in range(n)]


def test_a_folder_with_a_validation_file_is_refused_unless_allowed(d, caplog):
    folder = _images(d / "data")
    _jsonl(folder / "train.jsonl", _t2i_rows(6, "train"))
    _jsonl(folder / "val.jsonl", _t2i_rows(4, "val"))
    (folder / "README.md").write_text("notes")
    with caplog.at_level(logging.INFO, logger="vembed_blocks.data"), pytest.raises(UserError) as err:
        training_batches(str(folder), list, **LOADER, max_steps=5)
    assert str(err.value) == (
        f"{folder}: val.jsonl ('val') looks like a validation or test split by its name, and a folder trains on "
        "every file it holds, so the evaluation rows would leak into training. Move the file out, point at the "
        "training file(s), or pass --allow-mixed-data (allow_mixed=True) to train on every file:\n"
        "  train.jsonl: jsonl, 6 rows, t2i\n"
        "  val.jsonl: jsonl, 4 rows, t2i"
    )
    assert caplog.messages == [
        f"{folder}: reading 2 data files:",
        "  train.jsonl: jsonl, 6 rows, t2i",
        "  val.jsonl: jsonl, 4 rows, t2i",
        "  not read (not .jsonl/.json/.parquet/.tar): README.md",
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vembed_blocks.data"):
        loader, rows = training_batches(str(folder), list, **LOADER, max_steps=5, allow_mixed=True)
        seen = [r.query.text for _, (batch,), _ in loader.steps(5) for r in batch]
    assert rows == 0 and sorted(seen) == sorted(r["query"] for r in _t2i_rows(6, "train") + _t2i_rows(4, "val"))
    assert f"{folder}: training on val.jsonl although its name says 'val' (allow_mixed)" in caplog.messages


def test_a_folder_mixing_row_formats_is_refused_naming_both(d, caplog):
    folder = _images(d / "mixed")
    _jsonl(folder / "captions.jsonl", _t2i_rows(3, "t2i"))
    _jsonl(folder / "pairs.jsonl", [{"query_image": "a.jpg", "positive": "b.jpg"}] * 2)
    with caplog.at_level(logging.INFO, logger="vembed_blocks.data"), pytest.raises(UserError) as err:
        training_batches(str(folder), list, **LOADER, max_steps=2)
    assert str(err.value) == (
        f"{folder}: the files hold different row formats (t2i: captions.jsonl; i2i: pairs.jsonl), and a folder "
        "trains on every file it holds, as one data set, so batches would mix them. Point at the files of one "
        "format, or pass --allow-mixed-data (allow_mixed=True) to read them together:\n"
        "  captions.jsonl: jsonl, 3 rows, t2i\n"
        "  pairs.jsonl: jsonl, 2 rows, i2i"
    )
    assert caplog.messages[1:] == ["  captions.jsonl: jsonl, 3 rows, t2i", "  pairs.jsonl: jsonl, 2 rows, i2i"]
    loader, _ = training_batches(str(folder), list, **LOADER, max_steps=2, allow_mixed=True)
    assert len(list(loader.steps(2))) == 2


def test_a_folder_of_capitalised_files_is_refused_with_the_hint(d):
    folder = _images(d / "caps")
    _jsonl(folder / "part-0.jsonl", [{"Query": "a cat", "Positive": "a.jpg"}] * 3)
    (folder / "part-1.jsonl").write_text("")  # empty: listed, not refused
    with pytest.raises(UserError) as err:
        training_batches(str(folder), list, **LOADER, max_steps=2)
    assert str(err.value).endswith("\n  part-1.jsonl: jsonl, 0 rows, empty")
    assert str(err.value).startswith(
        f"{folder}: part-0.jsonl has no readable row among its first 5, so every sample of it would be skipped; "
        "fix the file or the options (see its error):\n  part-0.jsonl: jsonl, 3 rows, no readable row: "
        f"{folder / 'part-0.jsonl'}:1: unknown format: row keys ['Positive', 'Query']"
    )
    assert "pass --columns query=Query,positive=Positive" in str(err.value)
    loader, _ = training_batches(
        str(folder), list, **LOADER, max_steps=1, columns=parse_columns("query=Query,positive=Positive")
    )
    ((_, (batch,), _),) = loader.steps(1)
    assert [r.query.text for r in batch] == ["a cat", "a cat"]


def test_a_glob_is_checked_a_brace_pattern_is_taken_as_named(d):
    _jsonl(d / "part-train.jsonl", _t2i_rows(2, "train"))
    _jsonl(d / "part-test.jsonl", _t2i_rows(2, "test"))
    with pytest.raises(UserError, match=r"part-test.jsonl \('test'\) looks like a validation or test split"):
        training_batches(str(d / "part-*.jsonl"), list, **LOADER, max_steps=1)
    loader, _ = training_batches(str(d / "part-{train,test}.jsonl"), list, **LOADER, max_steps=1)
    assert len(list(loader.steps(1))) == 1


def test_a_folder_without_data_files_says_what_it_holds(d):
    folder = d / "csvs"
    folder.mkdir()
    (folder / "train.csv").write_text("query,positive\na,b\n")
    with pytest.raises(UserError) as err:
        training_batches(str(folder), list, **LOADER, max_steps=1)
    assert str(err.value) == (
        f"{folder}: a folder with no .jsonl / .json / .parquet / .tar files (it holds train.csv); a CSV file is "
        "read on its own: give the file (or convert the files to JSONL to read them together)"
    )


@pytest.mark.parametrize(
    "name,word",
    [
        ("val.jsonl", "val"),
        ("train_val_3.jsonl", "val"),
        ("data-test.parquet", "test"),
        ("coco_val2017.jsonl", "val"),
        ("dev.jsonl", "dev"),
        ("Validation.JSONL", "validation"),
        ("eval-00001.tar", "eval"),
        ("interval.jsonl", None),
        ("trainval.jsonl", None),
        ("devices.jsonl", None),
        ("train-00000.tar", None),
    ],
)
def test_eval_split_word(name, word):
    assert eval_split_word(name) == word
