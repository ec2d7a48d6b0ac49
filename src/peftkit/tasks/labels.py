"""Labels as the user means them: one comparison key for label sets, references and predictions.

A classification-as-generation target is text a template renders, so the same label arrives in
several spellings::

    target " {type}"          -> " number"         (GPT-style templates start labels with a space)
    target "{label}\\n"        -> "spam\\n"
    target "{label}</s>"      -> "spam</s>"        (EOS text written into the target)
    generated, decoded        -> "number"          (special tokens dropped, whitespace stripped)
    label_match: casefold     -> "Spam" is "spam"

Every side goes through one key (:func:`label_key`): special-token text removed (generation
decodes without it), surrounding whitespace stripped, case folded with ``casefold``. A label has
three forms, kept apart::

    key        what comparisons use                              "number"
    label      what reports show (metrics, CSV, baseline)        "number"
    text       the target text the model was trained to write    " number"
               (rank decoding scores exactly these tokens)

A prediction whose key is no label's key is invalid and is shown as generated (stripped).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

LABEL_MATCHES = ("exact", "casefold")


def label_key(text: str, casefold: bool = False, drop: Sequence[str] = ()) -> str:
    """The comparison key of ``text``: each ``drop`` string removed (special-token texts),
    surrounding whitespace stripped, case folded when ``casefold``."""
    for piece in drop:
        if piece:
            text = text.replace(piece, "")
    text = text.strip()
    return text.casefold() if casefold else text


def most_common(values: Iterable[str]) -> str:
    """The most frequent value; ties go to the one seen first."""
    counts = Counter(values)
    return max(counts, key=lambda v: counts[v])  # max keeps the first of equal counts


class LabelSet:
    """The label set of a generation-scored classifier: key -> label (shown) and text (trained).

    Args:
        labels: the labels as reports show them, in class order.
        texts: per label, the target text it was trained as (default: the label itself).
        casefold: compare without case (``task.label_match: casefold``).
        drop: texts removed before comparing (the tokenizer's special tokens: generation decodes
            with them skipped, so a target written with ``</s>`` must compare without it).

    Raises:
        ValueError: two labels share a key (they could not be told apart).
    """

    def __init__(
        self,
        labels: Sequence[str],
        texts: Sequence[str] | None = None,
        casefold: bool = False,
        drop: Sequence[str] = (),
    ) -> None:
        self.casefold = casefold
        self.drop = tuple(sorted((d for d in drop if d), key=len, reverse=True))
        self.texts = [str(t) for t in (texts if texts is not None else labels)]
        if len(self.texts) != len(labels):
            raise ValueError(f"{len(labels)} labels but {len(self.texts)} label texts")
        self.labels = [label_key(str(label), drop=self.drop) for label in labels]
        self._by_key: dict[str, str] = {}
        given: dict[str, str] = {}  # key -> the label as given, to name both of a clash
        for original, label in zip(labels, self.labels):
            key = self.key(label)
            if not key:
                raise ValueError(f"label {original!r} is empty once whitespace is stripped")
            if key in self._by_key:
                raise ValueError(
                    f"labels {given[key]!r} and {original!r} are the same label once "
                    f"compared ({'case folded, ' if casefold else ''}surrounding whitespace "
                    "stripped); merge them with task.label_map"
                )
            self._by_key[key] = label
            given[key] = str(original)

    def key(self, text: str) -> str:
        return label_key(text, self.casefold, self.drop)

    def match(self, text: str) -> str | None:
        """The label ``text`` spells, or None (an invalid prediction)."""
        return self._by_key.get(self.key(text))

    def shown(self, text: str) -> str:
        """``text`` as reports show it: its label, else the text stripped (invalid)."""
        label = self.match(text)
        return label if label is not None else label_key(text, drop=self.drop)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"LabelSet({self.labels!r}, texts={self.texts!r}, casefold={self.casefold})"
