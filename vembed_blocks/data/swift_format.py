"""ms-swift's embedding rows (the format Qwen3-VL-Embedding users train with) as ``Record``s.

A row (JSONL line or Parquet row)::

    {"messages": [{"role": "system", "content": instruction},        (system turn optional)
                  {"role": "user", "content": "<image>a query"}],
     "images": [path, ...],                                        one per <image> in messages
     "positive_messages": [[{"role": "user", "content": ...}], ...], one conversation per positive
     "positive_images": [[path, ...], ...],                        one list per positive conversation
     "negative_messages": [[...], ...], "negative_images": [[...], ...],   (hard negatives, optional)
     "label": number}          (optional: ms-swift's score / pair flag, kept as extra["swift_label"])

Each conversation is one ``Item``: its user turn's content with the ``<image>`` tags removed (the text
around each tag stripped and joined by one space; None when only tags are left) and the paths listed for
it, in order. The number of tags must equal the number of paths, conversation by conversation. The
query's system turn is kept as ``Record.extra["instruction"]`` (`data.collate.VLMCollator` sends it as
that query's system turn); a positive's or negative's system turn is prepended to its text with a space,
which is what ms-swift's Qwen3-Embedding template feeds the model.

Several positives: one ``Record`` per positive, each with the same query and all the row's negatives.
So that no positive is an in-batch negative of its own query, the records of such a row share a label
(the losses mask same-label pairs): ``"file:line#q"``. ms-swift's own ``label`` (a score for its cosine
loss, a 0/1 flag for its pair losses) is no class, so it never becomes ``Record.label`` (a shared 1 would
mask every row from every other): `records.parse_row` keeps it as ``extra["swift_label"]``.

`records.parse_row` detects the format (the row has ``messages`` or ``positive_messages``) and calls
`swift_records`. Imports: standard library, `data.records` (already loaded when a row reaches here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .records import Item, Record

if TYPE_CHECKING:
    from .records import _Row

__all__ = ["IMAGE_TAG", "SWIFT_FIELDS", "swift_records"]

IMAGE_TAG = "<image>"
# the row keys this format reads: kept out of Record.extra
SWIFT_FIELDS = ("messages", "images", "positive_messages", "positive_images", "negative_messages", "negative_images")
_UNREAD = ("videos", "audios", "positive_videos", "positive_audios", "negative_videos", "negative_audios")


def swift_records(row: _Row) -> list[Record]:
    """One ``Record`` per positive conversation of an ms-swift row (see the module docstring)."""
    unread = [k for k in _UNREAD if row.raw.get(k)]
    if unread:  # their <video>/<audio> tags would otherwise stay in the text as words
        raise row.fail(f"fields {unread} are not read: only text and images are supported")
    if row.raw.get("messages") is None:
        raise row.fail(f"missing field 'messages' (row keys: {sorted(row.raw)})")
    query, instruction = _conversation(
        row, "messages", row.raw["messages"], _paths(row, "images", row.raw.get("images"))
    )
    positives = _conversations(row, "positive", required=True)
    negatives = _conversations(row, "negative", required=False)
    # siblings share a label so the same-label mask keeps them out of each other's candidates
    label = f"{row.source}#q" if len(positives) > 1 else None
    extra = {"instruction": instruction} if instruction is not None else {}
    return [
        Record(query=query, positive=p, negatives=list(negatives), label=label, format="swift", extra=dict(extra))
        for p in positives
    ]


def _conversations(row: _Row, side: str, required: bool) -> list[Item]:
    """The ``{side}_messages`` conversations as items, their images from ``{side}_images`` (a list per
    conversation)."""
    name, images_name = f"{side}_messages", f"{side}_images"
    convs = row.raw.get(name)
    if convs is None:
        if required:
            raise row.fail(f"missing field {name!r} (row keys: {sorted(row.raw)})")
        convs = []
    if not isinstance(convs, list):
        raise row.fail(f"{name!r} must be a list of conversations, got {type(convs).__name__}")
    if required and not convs:
        raise row.fail(f"{name!r} is empty: a row needs at least one positive")
    images = row.raw.get(images_name)
    images = [None] * len(convs) if images is None else images
    if not isinstance(images, list) or len(images) != len(convs):
        got = f"{len(images)} lists" if isinstance(images, list) else type(images).__name__
        raise row.fail(
            f"{images_name!r} must hold one list of paths per conversation in {name!r}: "
            f"{len(convs)} conversations, got {got}"
        )
    out = []
    for i, (conv, paths) in enumerate(zip(convs, images)):
        item, system = _conversation(row, f"{name}[{i}]", conv, _paths(row, f"{images_name}[{i}]", paths))
        text = item.text if system is None else " ".join(t for t in (system, item.text) if t)
        out.append(Item(text=text, images=item.images))
    return out


def _paths(row: _Row, name: str, value: Any) -> tuple[str, ...]:
    """Resolved image paths of one conversation: ``value`` is a list of paths, or None (no images)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise row.fail(f"{name!r} must be a list of image paths, got {type(value).__name__}")
    return tuple(row.image(name, v) for v in value)


def _conversation(row: _Row, name: str, turns: Any, images: tuple[str, ...]) -> tuple[Item, str | None]:
    """``(item, system text or None)`` of one conversation: its one user turn's text without the
    ``<image>`` tags, and ``images``, whose count must equal the tags'."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise row.fail(f"{name!r} must be a list of turns {{'role': ..., 'content': str}}, got {turns!r:.80}")
    by_role: dict[str, list[str]] = {}
    for t in turns:
        role, content = t.get("role"), t.get("content")
        if role not in ("system", "user"):  # an assistant turn means nothing to an embedding
            raise row.fail(f"{name!r}: a turn's role must be 'system' or 'user', got {role!r}")
        if not isinstance(content, str):
            raise row.fail(f"{name!r}: a {role} turn's content must be a string, got {type(content).__name__}")
        by_role.setdefault(role, []).append(content)
    users, systems = by_role.get("user", []), by_role.get("system", [])
    if len(users) != 1 or len(systems) > 1:
        raise row.fail(
            f"{name!r}: expected one user turn and at most one system turn, got {len(users)} and {len(systems)}"
        )
    content = users[0]
    tags = content.count(IMAGE_TAG)
    if tags != len(images):
        raise row.fail(f"{name!r} has {tags} {IMAGE_TAG} tag(s) but {len(images)} image path(s) are listed for it")
    text = " ".join(p.strip() for p in content.split(IMAGE_TAG) if p.strip()) or None  # "a <image> b": "a b"
    if text is None and not images:
        raise row.fail(f"{name!r}: empty user turn (no text, no image)")
    system = systems[0].strip() if systems and systems[0].strip() else None
    return Item(text=text, images=images), system
