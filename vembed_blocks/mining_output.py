"""A records file with mined hard negatives and their scores, as JSONL or Parquet (`write_mined_file`)."""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .mining import mine_hard_negatives

__all__ = ["write_mined_file"]

TextTeacher = Callable[[list, list], torch.Tensor]  # (query texts [c], candidate texts [c][j]) -> scores [c, j]


def write_mined_file(
    records: list,
    encode: Callable[[list, bool], torch.Tensor],
    out: str,
    k: int,
    margin: float | None = None,
    max_ratio: float | None = None,
    batch_size: int = 128,
    *,
    rank_range: tuple[int, int] | None = None,
    seed: int = 0,
    teacher: TextTeacher | None = None,
    teacher_depth: int | None = None,
    teacher_margin: float | None = None,
    teacher_ratio: float | None = None,
) -> int:
    """Mine ``k`` hard negatives per text record and write the records, with them, to ``out``.

    ``out`` ending in ``.parquet`` is written as Parquet (the ``parquet`` extra), anything else as
    JSONL; both load back with `data.records.load_records`. Every rank embeds a share of the unique
    queries and documents (``encode(items, is_query)``, `embed.embed_on_all_ranks`); rank 0 mines
    (`mine_hard_negatives`, once per unique query) and writes, atomically: ``out`` appears complete or
    not at all. Every positive of a query (a query may have several records) is one of its positives
    there: never its negative, and the margin / ratio filter measures against the lowest of them. A
    row's own negatives come first, de-duplicated. ``rank_range``, ``seed``, ``teacher_*`` go to the
    miner; ``teacher(query_texts[c], candidate_texts[c][j]) -> scores[c, j]`` scores texts (a
    cross-encoder, or a bigger embedder's cosine).

    Each row keeps its fields and gets ``negatives``, ``negative_scores`` (the student's cosine of each
    negative, in order) and ``positive_score``; with a teacher also ``teacher_negative_scores`` and
    ``teacher_positive_score``. Readers keep those as ``Record.extra``. Returns the number of rows
    written (on every rank).
    """
    from .distributed import get_rank, is_dist
    from .embed import embed_on_all_ranks, retrieval_set

    if out.endswith(".parquet"):
        _pyarrow(out)  # before the embedding: a missing extra fails at once
    rs = retrieval_set(records)
    q = embed_on_all_ranks(rs.queries, lambda items: encode(items, True), batch_size, "mining: embed queries")
    d = embed_on_all_ranks(rs.docs, lambda items: encode(items, False), batch_size, "mining: embed corpus")
    if get_rank() == 0:
        options = dict(rank_range=rank_range, seed=seed, teacher_depth=teacher_depth)
        options.update(teacher_margin=teacher_margin, teacher_ratio=teacher_ratio)
        rows = _mined_rows(records, rs, q, d, k, margin, max_ratio, teacher, batch_size, options)
        _write_rows(rows, out)
    if is_dist():
        torch.distributed.barrier()
    return len(records)


def _mined_rows(records, rs, q, d, k, margin, max_ratio, teacher, batch_size, options) -> Iterator[dict]:
    """The output rows, one per record, in order (see `write_mined_file`)."""
    width = max(len(s) for s in rs.relevant)
    pos = torch.tensor([sorted(s) + [-1] * (width - len(s)) for s in rs.relevant])  # [Q, P], -1 padded
    text_teacher = None
    if teacher is not None:

        def text_teacher(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            texts = [[rs.docs[j].text for j in r] for r in cols.tolist()]
            return torch.as_tensor(teacher([rs.queries[i].text for i in rows.tolist()], texts))

    k = min(k, len(rs.docs))
    mined = mine_hard_negatives(q, d, pos, k, margin, max_ratio, teacher=text_teacher, **options)
    q_of, d_of = {x: i for i, x in enumerate(rs.queries)}, {x: i for i, x in enumerate(rs.docs)}
    rows = []  # (record, query row, negative doc indices)
    for r in records:
        qi = q_of[r.query]
        found = [j for j in mined.indices[qi].tolist() if j >= 0]
        rows.append((r, qi, list(dict.fromkeys([d_of[n] for n in r.negatives] + found))))
    own_t = _own_teacher_scores(rows, mined, rs, teacher, batch_size) if teacher is not None else {}
    for r, qi, negs in rows:
        qn = F.normalize(q[qi].float(), dim=-1)
        row = {**r.extra, "query": r.query.text, "positive": r.positive.text}
        row["negatives"] = [rs.docs[j].text for j in negs]
        row["negative_scores"] = (F.normalize(d[negs].float(), dim=-1) @ qn).tolist() if negs else []
        row["positive_score"] = float(F.normalize(d[d_of[r.positive]].float(), dim=-1) @ qn)
        if teacher is not None:
            t_of = dict(zip(mined.indices[qi].tolist(), mined.teacher_scores[qi].tolist()))
            row["teacher_negative_scores"] = [t_of[j] if j in t_of else own_t[qi, j] for j in negs]
            column = pos[qi].tolist().index(d_of[r.positive])
            row["teacher_positive_score"] = float(mined.teacher_positive_scores[qi, column])
        yield row | ({"label": r.label} if r.label is not None else {})


def _own_teacher_scores(rows, mined, rs, teacher, batch_size) -> dict:
    """``{(query row, doc): teacher score}`` for the records' own negatives the miner did not score,
    ``batch_size`` pairs a call (``[c][1]`` candidates each)."""
    scored = [set(r) for r in mined.indices.tolist()]
    pairs = list(dict.fromkeys((qi, j) for _, qi, negs in rows for j in negs if j not in scored[qi]))
    scores = {}
    for s in range(0, len(pairs), batch_size):
        part = pairs[s : s + batch_size]
        got = torch.as_tensor(teacher([rs.queries[i].text for i, _ in part], [[rs.docs[j].text] for _, j in part]))
        scores.update(zip(part, got.reshape(-1).tolist()))
    return scores


def _pyarrow(out: str):
    """``(pyarrow, pyarrow.parquet)``, or an ImportError naming the extra."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"writing {out} needs pyarrow: pip install vembed-blocks[parquet]") from e
    return pa, pq


def _write_rows(rows: Iterator[dict], out: str) -> None:
    """JSONL streamed row by row; Parquet as one table (the rows are held in memory), then renamed."""
    tmp = out + ".tmp"
    if out.endswith(".parquet"):
        pa, pq = _pyarrow(out)
        pq.write_table(pa.Table.from_pylist(list(rows)), tmp, row_group_size=65536)
    else:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    os.replace(tmp, out)
