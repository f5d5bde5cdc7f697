"""Token-budget batches: each global batch holds rows of similar length, each rank's share fits a token budget.

``TokenBudgetSampler(lengths, token_budget)`` is a drop-in for `WeightedTaskSampler` over one task (a
training file) in `TaskBatches` / `TaskLoader`: ``next(sampler) -> (task, this rank's row indices)``.
``lengths[i]`` is row ``i``'s padded-width cost (tokens of its longest text); the budget is per rank per
micro-batch in padded tokens: ``rows on the rank * their longest length <= token_budget``.

How a pass is cut: pass ``p`` is a keyed permutation of the rows (`sampler._feistel` keyed by
``(seed, task, p)``), split into windows of ``window`` rows (the last window takes the remainder, so a
window never straddles a pass). A window's rows are sorted by length (ties: permutation order) and cut
greedily into the longest global batches whose every rank's share fits the budget; rank ``r`` takes sorted
positions ``r::world_size`` (similar token loads; ranks ragged by one row at most). The window's batches
are then taken in a keyed order (a Feistel permutation keyed by ``(seed, task, p, window)``). Everything
derives from ``(seed, lengths, token_budget, world_size, window)``, so every rank computes the same global
batches without communicating, and the state is five integers plus a fingerprint: a resume recomputes
the current window only.

Also here: ``row_texts`` / ``token_lengths`` / ``row_lengths`` / ``lengths_for`` (a text row's lengths
from a tokenizer, for ``lengths``) and ``budget_sampler`` (what `loader.task_loader` builds).

Imports: numpy, `data.sampler` (its keyed hash and Feistel permutation), `user_errors`; the tokenizer
helpers call the tokenizer they are given (nothing heavy is loaded here).
"""

from __future__ import annotations

import warnings
import zlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..user_errors import UserError
from .sampler import _feistel, _mix, _name_key, rank_and_world

if TYPE_CHECKING:
    from .records import Record

__all__ = ["TokenBudgetSampler", "budget_sampler", "lengths_for", "row_lengths", "row_texts", "token_lengths"]

_WINDOW_BATCHES = 50  # the default window holds about this many global batches
_ORDER = 0x0B  # keys the batch order within a window apart from the row permutation


def _cut(lengths: np.ndarray, budget: int, world: int) -> list[int]:
    """Boundaries ``[0, b_1, ..., len(lengths)]`` of global batches over ``lengths[n]`` sorted ascending.

    Greedy: a batch from ``s`` grows while the new row (the longest so far, going to rank ``i % world`` as
    its ``i // world + 1``-th row) keeps that rank within ``budget``; its first ``world`` rows always go in
    (one row per rank, even over the budget). A batch ending the window with fewer than ``world`` rows
    takes rows from the one before when that one keeps ``world``, else joins it: the only case where a
    rank's micro-batch (of 2 rows, each longer than half the budget) exceeds the budget.
    """
    n, s, bounds = len(lengths), 0, [0]
    while s < n:
        per_rank = max(1, budget // int(lengths[s]))  # later rows are no shorter: no rank holds more
        span = lengths[s : s + world * per_rank]
        i = np.arange(len(span))
        fits = (i // world + 1) * span <= budget
        fits[:world] = True
        over = np.flatnonzero(~fits)
        s += int(over[0]) if len(over) else len(span)
        bounds.append(s)
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < world:
        if bounds[-1] - bounds[-3] >= 2 * world:
            bounds[-2] = bounds[-1] - world  # a prefix of a batch that fitted fits; world rows: one each
        else:
            del bounds[-2]
    return bounds


def _default_window(lengths: np.ndarray, budget: int, world: int) -> int:
    """About ``_WINDOW_BATCHES`` global batches of the median row, within ``[world, len(lengths)]``."""
    per_rank = max(1, budget // max(1, int(np.median(lengths))))
    return int(min(len(lengths), max(world, _WINDOW_BATCHES * world * per_rank)))


class TokenBudgetSampler:
    """Infinite ``(task, indices)`` iterator of token-budget batches over one task; see the module docstring.

    Args:
        lengths: ``[n]`` ints >= 1, row ``i``'s padded-width cost (tokens of its longest text).
        token_budget: padded tokens per rank per micro-batch (``rows * longest <= token_budget``; a row
            longer than the budget gets a micro-batch of its own).
        seed: the row permutation of each pass and the batch order within each window derive from it.
        rank, world_size: this rank's share; default from the process group (0 / 1 without one).
        task: the name ``next`` returns (`TaskBatches` looks the rows up under it).
        window: rows sorted together (``None``: about 50 global batches of the median row). Larger:
            closer lengths within a batch; smaller: more varied batch membership from pass to pass.

    Every pass uses each row exactly once; a global batch never holds a row twice; each rank gets at
    least one row (hence ``n >= world_size``). ``state_dict()`` is O(1) and ``load_state_dict()`` resumes
    exactly; it refuses another seed, budget, world size, window or set of lengths.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        token_budget: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        task: str = "train",
        window: int | None = None,
    ) -> None:
        rank, world_size = rank_and_world(rank, world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        n = len(self.lengths)
        if int(token_budget) < 1:
            raise UserError(f"the token budget must be >= 1 token, got {token_budget}")
        if n < world_size:
            raise UserError(f"a token budget needs at least one row per rank: {n} rows for {world_size} ranks")
        if (self.lengths < 1).any():
            raise ValueError(f"row lengths must be >= 1 token; row {int(np.argmin(self.lengths))} has fewer")
        self.token_budget, self.seed, self.rank, self.world_size = int(token_budget), int(seed), rank, world_size
        self.task, self.tasks = task, [task]
        self.window = _default_window(self.lengths, self.token_budget, world_size) if window is None else int(window)
        if not world_size <= self.window:
            raise ValueError(f"window must hold at least world_size ({world_size}) rows, got {self.window}")
        self.windows = max(1, n // self.window)  # windows per pass; the last takes the remainder
        self.fingerprint = zlib.crc32(self.lengths.astype("<i8").tobytes())
        self.step, self.pass_, self.window_index, self.batch_index = 0, 0, 0, 0
        self.drawn_rows = 0  # rows of the last global batch drawn, all ranks (`TaskLoader.step_rows` sums them)
        self._cache: tuple[tuple[int, int], list[np.ndarray]] | None = None  # the current window's batches
        long = int((self.lengths > self.token_budget).sum())
        if long:
            warnings.warn(
                f"{long} of {n} rows are longer than the token budget ({self.token_budget}): each gets a "
                "micro-batch of its own",
                stacklevel=2,
            )

    def window_batches(self, pass_: int, window: int) -> list[np.ndarray]:
        """The global batches of window ``window`` of pass ``pass_`` in the order they are drawn: each an
        int64 array of row indices sorted by length (rank ``r`` takes ``[r::world_size]``)."""
        n, key = len(self.lengths), _name_key(self.task)
        start = window * self.window
        stop = n if window == self.windows - 1 else start + self.window
        rows = _feistel(np.arange(start, stop), n, [_mix(self.seed, key, pass_, r) for r in range(4)])
        rows = rows[np.argsort(self.lengths[rows], kind="stable")]
        bounds = _cut(self.lengths[rows], self.token_budget, self.world_size)
        batches = [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        order = _feistel(
            np.arange(len(batches)), len(batches), [_mix(self.seed, key, pass_, window, _ORDER, r) for r in range(4)]
        )
        return [batches[i] for i in order]

    def batches_per_pass(self, pass_: int = 0) -> int:
        """Global batches (sampler steps) in pass ``pass_``; computes the whole pass (O(n log window))."""
        return sum(len(self.window_batches(pass_, w)) for w in range(self.windows))

    def _current(self) -> list[np.ndarray]:
        where = (self.pass_, self.window_index)
        if self._cache is None or self._cache[0] != where:
            self._cache = (where, self.window_batches(*where))
        return self._cache[1]

    def draw_spec(self) -> str:
        """Everything the batches depend on, as text: two samplers with equal specs draw the same batches."""
        spec = (self.seed, self.token_budget, self.world_size, len(self.lengths), self.fingerprint, self.window)
        return repr(("token_budget", self.task, *spec))

    def draw(self, step: int) -> tuple[str, str]:
        """The (task, stream key) of step ``step``: always this sampler's one task."""
        return self.task, self.task

    def __iter__(self) -> Iterator[tuple[str, list[int]]]:
        return self

    def __next__(self) -> tuple[str, list[int]]:
        batches = self._current()
        rows = batches[self.batch_index]
        self.drawn_rows = len(rows)
        self.step, self.batch_index = self.step + 1, self.batch_index + 1
        if self.batch_index == len(batches):
            self.batch_index, self.window_index = 0, self.window_index + 1
            if self.window_index == self.windows:
                self.window_index, self.pass_ = 0, self.pass_ + 1
        return self.task, rows[self.rank :: self.world_size].tolist()

    def _identity(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "token_budget": self.token_budget,
            "world_size": self.world_size,
            "rows": len(self.lengths),
            "lengths_crc32": self.fingerprint,
            "window_rows": self.window,
        }

    def state_dict(self) -> dict[str, Any]:
        """``step``, ``pass``, ``window``, ``batch`` (the next batch's place) and what the batches derive from:
        plain ints, JSON-serialisable."""
        where = {"step": self.step, "pass": self.pass_, "window": self.window_index, "batch": self.batch_index}
        return {**where, **self._identity()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next batches equal those an uninterrupted run would have drawn.

        Refuses (``ValueError`` naming each) a state of another seed, token budget, world size, window,
        row count or row lengths (``lengths_crc32``), or one saved without a token budget."""
        if "token_budget" not in state:
            raise ValueError(
                "the sampler state was saved without a token budget (batch_size batches); this run "
                f"has token_budget={self.token_budget}: resume with the batching it was saved with"
            )
        mine = self._identity()
        diffs = [f"{k}: saved {state.get(k)}, now {v}" for k, v in mine.items() if state.get(k) != v]
        if diffs:
            raise ValueError(
                "the token-budget sampler state differs from this sampler ("
                + "; ".join(diffs)
                + "): resume with the data, seed, --token-budget and world size it was saved with"
            )
        pass_, window, batch = int(state["pass"]), int(state["window"]), int(state["batch"])
        if not 0 <= window < self.windows or pass_ < 0:
            raise ValueError(f"sampler state names window {window} of pass {pass_}; a pass has {self.windows}")
        batches = self.window_batches(pass_, window)
        if not 0 <= batch < len(batches):
            raise ValueError(f"sampler state names batch {batch} of a window with {len(batches)} batches")
        self._cache = ((pass_, window), batches)
        self.pass_, self.window_index, self.batch_index, self.step = pass_, window, batch, int(state["step"])


def budget_sampler(
    tasks: Mapping[str, Sequence[Any]],
    lengths: Sequence[int] | None,
    token_budget: int,
    *,
    seed: int,
    rank: int,
    world_size: int,
    **options: Any,
) -> TokenBudgetSampler:
    """The `TokenBudgetSampler` `loader.task_loader` uses for ``token_budget``: one task, ``lengths`` per row.

    Raises ``UserError`` for several tasks, weights or groups (``options``), or missing / mismatched lengths."""
    if len(tasks) != 1:
        raise UserError(f"a token budget batches one training file; got tasks {sorted(tasks)}")
    if options:
        raise UserError(f"a token budget takes no {sorted(options)} (weights and groups are for batch_size batches)")
    ((task, rows),) = tasks.items()
    if lengths is None:
        raise UserError(
            "a token budget needs each row's length in tokens: pass row_length (e.g. "
            "length_batches.lengths_for(collator)) to training_batches, or lengths to task_loader"
        )
    if len(lengths) != len(rows):
        raise UserError(f"got {len(lengths)} row lengths for the {len(rows)} rows of {task!r}")
    return TokenBudgetSampler(lengths, token_budget, seed=seed, rank=rank, world_size=world_size, task=task)


def row_texts(record: Record, query_instruction: str | None = None, doc_instruction: str | None = None) -> list[str]:
    """A text row's texts as its collator tokenizes them: query, positive, then each negative (instructions
    prefixed verbatim, as `collate.TextCollator` does). ``UserError`` for a row with images."""
    sides = [(record.query, query_instruction), (record.positive, doc_instruction)]
    texts = []
    for item, prefix in [*sides, *((neg, doc_instruction) for neg in record.negatives)]:
        if item.images or item.text is None:
            where = record.source or "a row"
            raise UserError(f"{where}: has images; token budgets are for text rows (drop --token-budget)")
        texts.append(prefix + item.text if prefix else item.text)
    return texts


def token_lengths(
    texts_per_row: Sequence[Sequence[str]], tokenizer: Any, max_length: int | None = None, batch: int = 1024
) -> list[int]:
    """``[n]``: each row's longest text in tokens, special tokens included, truncated at ``max_length``
    (``None``: not truncated), as the collator's padding sees it. ``tokenizer`` is called on ``batch``
    texts at a time without padding (a fast tokenizer does this in parallel)."""
    owner = np.repeat(np.arange(len(texts_per_row)), [len(t) for t in texts_per_row])
    flat = [text for texts in texts_per_row for text in texts]
    counts = np.zeros(len(flat), dtype=np.int64)
    for a in range(0, len(flat), batch):
        enc = tokenizer(flat[a : a + batch], padding=False, truncation=max_length is not None, max_length=max_length)
        counts[a : a + batch] = [len(ids) for ids in enc["input_ids"]]
    out = np.zeros(len(texts_per_row), dtype=np.int64)
    np.maximum.at(out, owner, counts)
    return out.tolist()


def row_lengths(
    records: Sequence[Record],
    tokenizer: Any,
    max_length: int | None = None,
    query_instruction: str | None = None,
    doc_instruction: str | None = None,
    batch: int = 1024,
) -> list[int]:
    """``[n]``: each text record's longest text (`row_texts`) in tokens (`token_lengths`)."""
    texts = [row_texts(r, query_instruction, doc_instruction) for r in records]
    return token_lengths(texts, tokenizer, max_length, batch)


def lengths_for(collator: Any) -> Callable[[Sequence[Record]], list[int]]:
    """``records -> [n] lengths`` with a text collator's tokenizer (or its processor's), ``max_length`` and
    instructions: what ``training_batches(..., row_length=...)`` takes."""
    tokenizer = getattr(collator, "tokenizer", None) or getattr(collator.processor, "tokenizer")
    options = dict(max_length=getattr(collator, "max_length", None))
    options.update(query_instruction=collator.query_instruction, doc_instruction=collator.doc_instruction)
    return lambda records: row_lengths(records, tokenizer, **options)
