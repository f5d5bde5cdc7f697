"""input_check: real tokenizers and processors (the demos' builders) through the real collators; every share and
count asserted against a plain count written here; strict vs warnings; check_embeddings and its use in
evaluate_retrieval_by; 2 gloo ranks agreeing on one verdict from their summed counts."""

from __future__ import annotations

import logging

import pytest
import torch
from _multiproc import run_ranks
from PIL import Image, ImageDraw

from vembed_blocks.data.collate import DualEncoderCollator, FixedNegatives, TextCollator, VLMCollator
from vembed_blocks.data.embed_store import collate_embeddings
from vembed_blocks.data.records import Item, Record
from vembed_blocks.demo.shapes import build_tiny_clip, demo_words, word_level_tokenizer
from vembed_blocks.input_check import InputCheck, InputCheckError
from vembed_blocks.metrics import check_embeddings

WORDS = ["query", ":", "the", "red", "blue", "fox", "dog", "cat", "in", "garden", "river", "sleeps"]
LOGGER = "vembed_blocks.input_check"


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level BERT-style tokenizer (the demo's builder): [CLS] text [SEP], [UNK] for any other word."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    return word_level_tokenizer(
        WORDS, specials, "[CLS] $A [SEP]", punctuation=False, cls_token="[CLS]", sep_token="[SEP]"
    )


def _records(pairs: list[tuple[str, str]]) -> list[Record]:
    return [Record(Item(text=q), Item(text=p), source=f"rows.jsonl:{i + 1}") for i, (q, p) in enumerate(pairs)]


def _unknown_words(texts: list[str]) -> tuple[int, int]:
    """The plain count: (words not in WORDS, words) over ``texts`` (whitespace-separated)."""
    words = [w for t in texts for w in t.split()]
    return sum(w not in WORDS for w in words), len(words)


COVERED = [("red fox", "the red fox sleeps"), ("blue dog river", "the dog in the river"),
           ("cat in garden", "the cat sleeps"), ("the blue cat", "blue cat in the garden")]  # fmt: skip
UNCOVERED = [("zebra near red okapi", "the red fox sleeps"), ("yak with blue gnu", "a dog in the river"),
             ("cat on a quokka", "the cat sleeps"), ("tapir and kiwi", "blue cat in the garden")]  # fmt: skip


def test_covered_data_passes_and_counts_equal_the_plain_count(tokenizer):
    """Covered queries (an instruction prefixed) and positives: no finding; the instruction is not content; the
    FixedNegatives padding (copies of the positive, masked) is not counted."""
    collate = FixedNegatives(TextCollator(tokenizer, query_instruction="query: "), 2)
    check = InputCheck(collate, batches=2)  # the collator itself: its tokenizer is found
    assert check.see([collate(_records(COVERED[:2]))]) is None  # not yet: 1 of 2 steps
    assert check.see([collate(_records(COVERED[2:]))]) == [] and check.findings == []
    assert check.see([collate(_records(COVERED))]) is None  # after the verdict: nothing
    sides = check.summary()["sides"]
    unknown, words = _unknown_words([q for q, _ in COVERED])
    assert (sides["query"]["unknown_tokens"], sides["query"]["tokens"]) == (unknown, words) == (0, 11)
    assert (sides["positive"]["unknown_tokens"], sides["positive"]["tokens"]) == _unknown_words([p for _, p in COVERED])
    assert sides["query"]["text_rows"] == 4 and sides["query"]["empty_rows"] == 0
    assert sides["negatives"]["rows"] == 0 and sides["negatives"]["multi_row_batches"] == 0  # all padding
    # the wrapped collator's tokenizer was found: the same collator on uncovered rows is caught
    found = InputCheck(collate, batches=1, strict=False).see([collate(_records(UNCOVERED))])
    assert found[0].startswith("query: 80% of tokens (12 of 15) are the tokenizer's unknown token ([UNK])")


def test_uncovered_queries_stop_the_run_naming_side_and_share(tokenizer, caplog):
    collate = TextCollator(tokenizer, query_instruction="query: ")
    unknown, words = _unknown_words([q for q, _ in UNCOVERED])
    assert (unknown, words) == (12, 15)  # zebra near okapi, yak with gnu, on a quokka, tapir and kiwi: 12 of 15
    check = InputCheck(tokenizer, batches=2)
    check.see([collate(_records(UNCOVERED[:1])), collate(_records(UNCOVERED[1:2]))])  # 2 micro-batches a step
    with pytest.raises(InputCheckError) as err:
        check.see([collate(_records(UNCOVERED[2:]))])
    expected = (
        f"query: {unknown / words:.0%} of tokens ({unknown} of {words}) are the tokenizer's unknown token ([UNK]) "
        "in the first 2 steps: the model's tokenizer does not cover this data (a demo or wrong --model?); "
        "pass --ignore-input-check to train anyway"
    )
    assert err.value.findings[0] == expected and expected in str(err.value)
    # the positives' one unknown word ("a") is 1 of 16 tokens: over 5%, a warning listed after the error
    assert err.value.findings[1].startswith("positive: 6% of tokens (1 of 17) are")
    assert check.summary()["sides"]["query"]["unknown_share"] == pytest.approx(unknown / words)

    loose = InputCheck(tokenizer, batches=1, strict=False)  # --ignore-input-check: the same lines, logged
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        found = loose.see([collate(_records(UNCOVERED))])  # one step of all 4 rows: the same counts
    expected = expected.replace("first 2 steps", "first 1 step")
    expected = expected.replace("; pass --ignore-input-check to train anyway", " (--ignore-input-check: training on)")
    assert found[0] == expected and [r.getMessage() for r in caplog.records] == found


def test_an_unknown_token_that_is_also_end_of_text_is_not_looked_for():
    """Byte-level BPE tokenizers (GPT-2's) name their end-of-text token "unknown" but never emit it for a word:
    such an id is no unknown token. Here [UNK] is also the EOS ending every row: counted, it would be 4 of 15."""
    tok = word_level_tokenizer(WORDS, ["[PAD]", "[UNK]"], "$A [UNK]", punctuation=False, eos_token="[UNK]")
    check = InputCheck(tok, batches=1)
    assert check.see([TextCollator(tok)(_records(COVERED))]) == []
    assert check.summary()["sides"]["query"]["unknown_tokens"] == 0
    assert check.summary()["sides"]["query"]["tokens"] == _unknown_words([q for q, _ in COVERED])[1] == 11


def test_empty_texts_and_identical_rows(tokenizer):
    """Texts the tokenizer drops entirely (blanks: no word) have only [CLS] [SEP]: 1 of 4 warns,
    3 of 4 stops. Every query the same text: a warning; a batch of one row is not compared."""
    collate = TextCollator(tokenizer)
    some = _records([("  ", "red fox"), ("cat", "dog"), ("blue dog", "the cat"), ("fox", "garden")])
    found = InputCheck(tokenizer, batches=1).see([collate(some)])
    assert found == [
        "query: 1 of 4 texts (25%) have no token but special ones in the first 1 step: empty texts, or texts "
        "the tokenizer drops entirely; check the data's text fields"
    ]
    most = _records([("  ", "red fox"), (" ", "dog"), ("   ", "the cat"), ("fox", "garden")])
    with pytest.raises(InputCheckError, match=r"query: 3 of 4 texts \(75%\) have no token but special ones"):
        InputCheck(tokenizer, batches=1).see([collate(most)])

    same = _records([("red fox", "the cat"), ("red fox", "the dog"), ("red fox", "garden")])
    check = InputCheck(tokenizer, batches=2)
    check.see([collate(same), collate(same[:1])])
    found = check.see([collate(same[1:])])
    assert found == [
        "query: in every micro-batch all rows are identical in the first 2 steps (2 micro-batches of 2+ rows): "
        "the data repeats one item, or the collator drops what differs"
    ]
    sides = check.summary()["sides"]
    assert sides["query"]["duplicate_rows"] == 3 + 2 and sides["positive"]["duplicate_rows"] == 0


def _png(path, rgb, shape_rgb=None) -> str:
    """A 40 px PNG of one colour, with a square of ``shape_rgb`` when given."""
    img = Image.new("RGB", (40, 40), rgb)
    if shape_rgb:
        ImageDraw.Draw(img).rectangle([10, 10, 25, 25], fill=shape_rgb)
    img.save(path)
    return str(path)


def test_one_colour_images_through_the_demo_clip_processor(tmp_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(build_tiny_clip(str(tmp_path / "clip"), quick=True))
    collate = DualEncoderCollator(processor)
    drawn = [_png(tmp_path / f"s{i}.png", (90, 90, 90), (200, 30 * i, 40)) for i in range(3)]
    flat = [_png(tmp_path / f"f{i}.png", c) for i, c in enumerate([(255, 255, 255), (10, 120, 200), (0, 0, 0)])]
    captions = ["a red square on the left", "a blue circle on the top", "green cross , right", "a white cross , top"]
    rows = lambda paths: [Record(Item(text=c), Item(images=(p,))) for c, p in zip(captions, paths)]
    check = InputCheck(processor, batches=1)
    assert check.see([collate(rows(drawn + flat[:1]))]) == [
        "positive: 1 of 4 images (25%) are one flat colour in the first 1 step: blank or broken image files, or an "
        "image processor that flattens them; check the images"
    ]
    assert check.summary()["sides"]["query"]["unknown_tokens"] == 0  # the demo's words: covered
    with pytest.raises(InputCheckError, match=r"positive: 3 of 3 images \(100%\) are one flat colour"):
        InputCheck(processor, batches=1).see([collate(rows(flat))])
    query_images = [Record(Item(images=(p,)), Item(images=(q,))) for p, q in zip(flat[:2], drawn[:2])]
    found = InputCheck(processor, batches=1, strict=False).see([collate(query_images)])  # I2I: the query side
    assert found[0].startswith("query: 2 of 2 images (100%) are one flat colour") and len(found) == 1


def test_qwen_vl_chat_batches_left_padded_with_instructions(tmp_path):
    """The demo Qwen3-VL's word-level tokenizer and chat template: its default instruction has 3 unknown words
    ("Represent", "'", "s"), the same in every row, so it is left out; demo captions pass, others stop the run;
    a one-colour image in the flat patches (split by image_grid_thw) is found."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vembed_blocks.demo.vlm import CHAT_WORDS, QWEN_CHAT, QWEN_SPECIALS
    from vembed_blocks.vlm import qwen_vl_processor

    tok = word_level_tokenizer((*demo_words(), *CHAT_WORDS), ("[PAD]", "[UNK]", *QWEN_SPECIALS),
                               eos_token="<|im_end|>", additional_special_tokens=list(QWEN_SPECIALS))  # fmt: skip
    images = Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=16, merge_size=2)
    processor = qwen_vl_processor(tok, images, QWEN_CHAT)
    collate = VLMCollator(processor)
    shape = _png(tmp_path / "shape.png", (90, 90, 90), (220, 40, 40))
    flat = _png(tmp_path / "flat.png", (20, 200, 20))
    captions = ["a red circle on the left", "blue square , top", "a photo of a green cross at the bottom"]
    demo = [Record(Item(text=c), Item(images=(p,))) for c, p in zip(captions, [shape, flat, shape])]
    batch = collate(demo)
    assert (batch["query"]["attention_mask"][:, 0] == 0).any()  # left padded
    check = InputCheck(collate, batches=1, strict=False)
    assert check.see([batch]) == [
        "positive: 1 of 3 images (33%) are one flat colour in the first 1 step: blank or broken image files, or an "
        "image processor that flattens them; check the images"
    ]
    sides = check.summary()["sides"]
    assert sides["query"]["unknown_tokens"] == 0 and sides["query"]["tokens"] == sum(len(c.split()) for c in captions)
    other = ["a zebra grazing", "two okapi in mud", "red kiwi bird"]
    known = {*demo_words(), *CHAT_WORDS, ",", "."}
    words = [w for t in other for w in t.split()]
    unknown = sum(w not in known for w in words)
    assert (unknown, len(words)) == (7, 10)  # zebra grazing two okapi mud kiwi bird
    with pytest.raises(InputCheckError, match=r"query: 70% of tokens \(7 of 10\) are the tokenizer's unknown token"):
        InputCheck(processor, batches=1).see([collate([Record(Item(text=t), Item(images=(shape,))) for t in other])])


def test_stored_embeddings_and_edit_rows():
    """multitask's stores (collate_embeddings: [B, D], per-token [B, L, D] + mask) and edit_sft's row lists."""
    same = [{"query": torch.tensor([1.0, 2.0]), "positive": torch.randn(3, 4)} for _ in range(3)]
    found = InputCheck(batches=1).see([collate_embeddings(same)])
    assert found == [
        "query: in every micro-batch all rows are one vector in the first 1 step (1 micro-batch of 2+ rows): the "
        "stored embeddings are constant: check the model that extracted them"
    ]
    torch.manual_seed(0)
    rows = [{"prompt": torch.randn(5, 8), "target": torch.full((3, 16, 16), 0.5), "sources": [], "id": "r"}] * 2
    found = InputCheck(batches=1, strict=False).see([rows])  # a micro-batch of edit rows is a list
    assert found[0].startswith("target: 2 of 2 images (100%) are one flat colour")
    assert "prompt: in every micro-batch all rows are one vector" in found[1]
    with pytest.raises(InputCheckError, match="target: 2 of 2 images"):
        InputCheck(batches=1).see([rows])


def test_check_embeddings_measures_one_vector():
    torch.manual_seed(0)
    v = torch.randn(8)
    finding = check_embeddings("query embeddings", torch.stack([v, 2 * v, v + 1e-5 * v]))  # one direction
    assert finding.startswith("query embeddings: all 3 rows are the same vector, max over rows of 1 - cos(row, mean")
    assert check_embeddings("query embeddings", torch.randn(4, 8)) is None
    assert check_embeddings("x", v[None]) is None  # one row: nothing to compare
    assert check_embeddings("x", torch.zeros(3, 8)) is not None
    assert check_embeddings("x", torch.stack([v, -v])) is None  # opposite rows: mean 0, not one vector
    tokens, mask = v.expand(3, 4, 8).clone(), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]).bool()
    tokens[~mask] = 0  # padding: what a multi-vector encoder's output holds there
    assert "each row's mean token vector" in check_embeddings("document embeddings", tokens, mask)
    assert check_embeddings("document embeddings", torch.randn(3, 4, 8), mask) is None


def test_evaluate_retrieval_by_warns_on_one_vector(caplog):
    from vembed_blocks.embed import evaluate_retrieval_by

    records = _records([("red fox", "the fox"), ("blue dog", "the dog"), ("cat", "the cat")])
    constant = lambda items, is_query: torch.ones(len(items), 4)
    with caplog.at_level(logging.WARNING):
        metrics = evaluate_retrieval_by(records, constant, batch_size=2)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "recall@1" in metrics  # the numbers are still reported
    assert any(m.startswith("query embeddings: all 3 rows are the same vector") for m in warned)
    assert any(m.startswith("document embeddings: all 3 rows are the same vector") for m in warned)
    caplog.clear()
    multi = lambda items, is_query: (torch.ones(len(items), 3, 4), torch.ones(len(items), 3, dtype=torch.bool))
    score = lambda q, d: q[0].mean(1) @ d[0].mean(1).T  # a multi-vector encoder's (tokens, mask), any scorer
    with caplog.at_level(logging.WARNING):
        evaluate_retrieval_by(records, multi, batch_size=2, score=score)
    assert any("rows are the same vector (each row's mean token vector)" in r.getMessage() for r in caplog.records)
    caplog.clear()
    distinct = lambda items, is_query: torch.nn.functional.one_hot(
        torch.tensor([sum(map(ord, i.text)) % 7 for i in items]), 7
    ).float()
    evaluate_retrieval_by(records, distinct, batch_size=2)
    assert not [r for r in caplog.records if "same vector" in r.getMessage()]


def _two_ranks(rank: int, world: int, tokenizer, covered: list, uncovered: list) -> dict:
    """Run 1: rank 1's queries uncovered -> both ranks raise the same error. Run 2: both covered, rank 0's rows
    with hard negatives and rank 1's without -> both pass with the same summed summary."""
    collate = TextCollator(tokenizer, query_instruction="query: ")
    out = {}
    check = InputCheck(tokenizer, batches=1)
    try:
        check.see([collate(_records(uncovered if rank == 1 else covered[:2]))])
    except InputCheckError as e:
        out["error"] = str(e)
    check = InputCheck(tokenizer, batches=1)
    records = _records(covered)
    if rank == 0:  # a side only one rank has: its name and counts still reach every rank
        records[0].negatives.append(Item(text="red dog"))
    out["findings"] = check.see([collate(records)])
    out["summary"] = check.summary()
    return out


def test_two_ranks_agree_on_summed_counts(tokenizer):
    results = run_ranks(_two_ranks, 2, tokenizer, COVERED, UNCOVERED)
    unknown, words = _unknown_words([q for q, _ in UNCOVERED])
    first_two = _unknown_words([q for q, _ in COVERED[:2]])[1]  # rank 0's 2 covered queries count too
    assert (unknown, words + first_two) == (12, 20)
    assert results[0]["error"] == results[1]["error"]
    assert "query: 60% of tokens (12 of 20) are the tokenizer's unknown token ([UNK])" in results[0]["error"]
    covered_words = _unknown_words([q for q, _ in COVERED])[1]
    assert results[0]["findings"] == results[1]["findings"] == []
    assert results[0]["summary"] == results[1]["summary"]
    sides = results[0]["summary"]["sides"]
    assert sides["query"]["tokens"] == 2 * covered_words and sides["query"]["text_rows"] == 8
    assert sides["negatives"]["text_rows"] == 1 and sides["negatives"]["tokens"] == 2


def test_side_tokenizers_for_a_teacher_with_its_own_tokenizer(tokenizer):
    """distill's batch layout with a live teacher: the teacher's ids are read with the teacher's tokenizer. Its
    id 1 is [CLS] (the student's [UNK]): read with the student's, every teacher row would hold one unknown, so
    without its tokenizer a "teacher" side gets no token check."""
    teacher = word_level_tokenizer(WORDS, ["[PAD]", "[CLS]", "[SEP]", "[UNK]"], "[CLS] $A [SEP]",
                                   punctuation=False, cls_token="[CLS]", sep_token="[SEP]")  # fmt: skip
    records = _records(COVERED)
    batch = {
        "student": TextCollator(tokenizer)(records),
        "teacher": TextCollator(teacher)(records),
        "teacher_emb": None,
    }
    wrong = InputCheck(tokenizer, batches=1, strict=False, side_tokenizers={"teacher": tokenizer}).see([batch])
    assert wrong and all(f.startswith("teacher/") for f in wrong)  # the student's [UNK] id read in teacher rows
    unchecked = InputCheck(tokenizer, batches=1)  # by default a "teacher" side's tokens are not read at all
    assert unchecked.see([batch]) == [] and unchecked.summary()["sides"]["teacher/query"]["unknown_tokens"] == 0
    check = InputCheck(tokenizer, batches=1, side_tokenizers={"teacher": TextCollator(teacher)})
    assert check.see([batch]) == []
    sides = check.summary()["sides"]
    assert sides["teacher/query"]["tokens"] == sides["student/query"]["tokens"] == 11
