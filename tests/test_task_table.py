"""Issue 27: one policy per task (the task table), per-record instructions, the published Qwen3-VL-Embedding
defaults. Expected values are written out in each test."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_vlm_instructions import _chat, processor  # noqa: F401  (the tiny Qwen-VL processor fixture)

from vembed_blocks.data.collate import TextCollator, VLMCollator
from vembed_blocks.data.records import Item, Record, RecordError
from vembed_blocks.published import published_defaults
from vembed_blocks.task_table import TaskCollate, TaskPolicy, TaskTableError, read_task_table


def _write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def files(tmp_path):
    for name in ("a.jsonl", "b.jsonl", "a_val.jsonl"):
        (tmp_path / name).write_text('{"query": "x", "positive": "y"}\n')
    return tmp_path


def test_jsonl_table_fills_what_a_row_leaves_out_from_the_defaults(files):
    rows = [
        {"name": "retrieval", "data": "a.jsonl", "val_data": "a_val.jsonl", "weight": 2, "batch_size": 64},
        {"name": "classify", "data": "b.jsonl", "in_batch_negatives": False, "temperature": 0.02,
         "query_instruction": "Classify it", "num_negatives": 3, "mrl_dims": [64, 32]},
    ]  # fmt: skip
    table = _write(files / "tasks.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    defaults = dict(batch_size=32, temperature=0.05, query_instruction="Q", doc_instruction="D", mrl_dims=(128,))
    got = read_task_table(table, defaults)
    assert list(got) == ["retrieval", "classify"]  # the table's order
    assert got["retrieval"] == TaskPolicy(
        "retrieval", str(files / "a.jsonl"), str(files / "a_val.jsonl"), 2.0, 64, True, 0.05, "Q", "D", 0, (128,)
    )
    assert got["classify"] == TaskPolicy(
        "classify", str(files / "b.jsonl"), None, 1.0, 32, False, 0.02, "Classify it", "D", 3, (64, 32)
    )


def test_csv_table_from_excel(files):
    """A byte-order mark, empty cells (= not given), on/off booleans and "64,32" widths."""
    text = "\ufeffname,data,batch_size,in_batch_negatives,mrl_dims,query_instruction\n"
    text += 'retrieval,a.jsonl,64,,,\nclassify,b.jsonl,,off,"64,32",Classify it\n'
    got = read_task_table(_write(files / "tasks.csv", text), dict(batch_size=8))
    assert (got["retrieval"].batch_size, got["retrieval"].in_batch_negatives, got["retrieval"].mrl_dims) == (
        64,
        True,
        (),
    )
    assert (got["classify"].batch_size, got["classify"].in_batch_negatives, got["classify"].mrl_dims) == (
        8,
        False,
        (64, 32),
    )
    assert got["classify"].query_instruction == "Classify it"


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"name": "a", "data": "a.jsonl", "batch": 3}', r"tasks.jsonl:2: unknown field\(s\) \['batch'\]"),
        ('{"name": "a"}', r"tasks.jsonl:2: missing \['data'\]"),
        ('{"name": "a/b", "data": "a.jsonl"}', "tasks.jsonl:2: name 'a/b'"),
        ('{"name": "b", "data": "nope.jsonl"}', "tasks.jsonl:2: data .*nope.jsonl does not exist"),
        ('{"name": "b", "data": "b.jsonl", "batch_size": 0}', "tasks.jsonl:2: batch_size must be an integer >= 1"),
        ('{"name": "b", "data": "b.jsonl", "batch_size": 2.5}', "tasks.jsonl:2: batch_size must be an integer"),
        ('{"name": "b", "data": "b.jsonl", "temperature": 0}', "tasks.jsonl:2: temperature must be a number > 0"),
        ('{"name": "b", "data": "b.jsonl", "weight": -1}', "tasks.jsonl:2: weight must be a number >= 0"),
        ('{"name": "b", "data": "b.jsonl", "in_batch_negatives": "maybe"}', "in_batch_negatives must be true or"),
        ('{"name": "b", "data": "b.jsonl", "mrl_dims": [64, 64]}', "mrl_dims must be distinct widths"),
        ('{"name": "b", "data": "b.jsonl", "mrl_dims": "x"}', "mrl_dims must be a list of widths"),
        ('{"name": "a", "data": "b.jsonl"}', "tasks.jsonl:2: task 'a' is named twice"),
        ('{"name": "b", "data": "b.jsonl"', "tasks.jsonl:2: not JSON"),
        ('["b"]', "tasks.jsonl:2: a task row is a JSON object"),
    ],
)
def test_bad_rows_name_file_line_and_field(files, row, message):
    table = _write(files / "tasks.jsonl", '{"name": "a", "data": "a.jsonl"}\n' + row + "\n")
    with pytest.raises(TaskTableError, match=message):
        read_task_table(table)


def test_empty_table_is_refused(files):
    with pytest.raises(TaskTableError, match="no task rows"):
        read_task_table(_write(files / "tasks.jsonl", "\n# nothing\n"))


def test_task_collate_tags_the_batch():
    assert TaskCollate("colour", lambda rows: {"n": len(rows)})([1, 2, 3]) == {"n": 3, "task": "colour"}


def test_a_records_own_instruction_is_its_querys_system_turn(processor):  # noqa: F811
    """ms-swift's system turn (Record.extra["instruction"]) replaces the query instruction for that row only;
    documents keep the document instruction; a row without one keeps the collator's."""
    collator = VLMCollator(processor, "Find the matching image", "Represent the document")
    rows = [
        Record(Item("red cat"), Item("cat"), extra={"instruction": "Classify the animal"}),
        Record(Item("cat red"), Item("red")),
    ]
    got = collator(rows)
    want_q = [_chat("Classify the animal.", "red cat"), _chat("Find the matching image.", "cat red")]
    want_d = [_chat("Represent the document.", "cat"), _chat("Represent the document.", "red")]
    for side, texts in (("query", want_q), ("positive", want_d)):
        want = processor(text=texts, padding=True, padding_side="left", return_tensors="pt")
        assert torch.equal(got[side]["input_ids"], want["input_ids"]), side


def test_a_text_collator_refuses_row_instructions_it_cannot_send():
    class Tok:
        def __call__(self, texts, **kw):
            return {"input_ids": torch.zeros(len(texts), 1, dtype=torch.long)}

    row = Record(Item("a"), Item("b"), extra={"instruction": "Classify"}, source="f.jsonl:3")
    with pytest.raises(RecordError, match="f.jsonl:3.*only VLMCollator sends"):
        TextCollator(Tok())([row])


def _folder(root, name: str, hidden: int | None, name_or_path: str = "") -> str:
    path = os.path.join(root, name)
    os.makedirs(path)
    config = {"model_type": "qwen3_vl", "_name_or_path": name_or_path}
    if hidden:
        config["text_config"] = {"hidden_size": hidden}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def test_published_defaults_of_qwen3_vl_embedding(tmp_path):
    targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    base = dict(lora=32, lora_alpha=32.0, bf16=True, lora_targets=targets)
    assert published_defaults("Qwen/Qwen3-VL-Embedding-2B") == {**base, "mrl_dims": "2048,1536,1024,512,256,128,64"}
    eight = "4096,3072,2048,1536,1024,512,256,128,64"
    assert published_defaults("Qwen/Qwen3-VL-Embedding-8B") == {**base, "mrl_dims": eight}
    local = _folder(tmp_path, "my-finetune", 1536, name_or_path="Qwen/Qwen3-VL-Embedding-2B")  # by its config
    assert published_defaults(local) == {**base, "mrl_dims": "1536,1024,512,256,128,64"}
    assert published_defaults(_folder(tmp_path, "qwen3_vl_embedding_tiny", 48)) == {**base, "mrl_dims": "48"}
    assert published_defaults(_folder(tmp_path, "Qwen3-VL-2B-Instruct", 2048)) == {}  # not the embedder
    assert published_defaults("Qwen/Qwen3-VL-2B-Instruct") == {} and published_defaults(None) == {}


def test_the_report_of_a_multi_task_run_names_the_table_and_each_tasks_steps(tmp_path):
    from vembed_blocks.report import write_report

    (tmp_path / "args.json").write_text(json.dumps({"tasks": "t.jsonl", "batch_size": 32, "data": None}))
    rows = [{"step": i + 1, "loss": 1.0, "task": t} for i, t in enumerate(["a", "b", "a", "a"])]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = open(write_report(str(tmp_path))).read()
    assert "- data: the task table `t.jsonl` (each task's data and val_data)" in text
    assert "- steps per task: a 3, b 1" in text and "- batch: each task's batch_size per rank" in text
