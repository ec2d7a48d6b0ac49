"""Token classification (NER): a tag per word, from a trained head on the encoder's tokens.

Rows are sentences as CoNLL files give them, ``{"tokens": [...], "tags": [...]}``. The distinct
train tags, sorted with ``O`` first (or ``task.labels``), become class ids and the model's
``id2label``. Words are split into sub-word tokens; only each word's first token carries its tag,
the rest (and special tokens) are ignored by the loss, so a word has exactly one prediction::

    words   ["Empire",  "State",       "Building"]       tags  [B-loc, I-loc, I-loc]
    tokens  [CLS] Emp ##ire  State  Build ##ing [SEP]
    labels  -100  B-loc -100 I-loc  I-loc -100  -100

Scored as seqeval / conlleval do: entity-level micro precision, recall and F1 (an entity counts
only with the right span and type; chunks read with conlleval's rules, so IOB1 and IOB2/BIOES
spellings of the same entities agree), plus token accuracy; next to the always-``O`` baseline.
Tags lose stray whitespace when read. Words cut off by ``max_length`` are predicted ``O``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..metrics import accuracy, seq_f1
from .base import (
    IGNORE_INDEX,
    EvalResult,
    Task,
    TaskOptions,
    at_least_two,
    input_positions,
    pad,
    pad_encoder_inputs,
)
from .scoring import majority_baseline


@dataclasses.dataclass
class TokenClsOptions(TaskOptions):
    """``task:`` fields of ``type: token_cls``.

    tokens: the column holding each sentence's words (a list).
    tags: the column holding one tag per word (a list, BIO / BIOES).
    labels: the tags in class-id order (default: ``O`` then the other train tags, sorted).
    max_length: token limit per sentence (sub-word tokens, special tokens included).
    """

    head_per_label = True

    tokens: str = "tokens"
    tags: str = "tags"
    labels: list[str] | None = None
    max_length: int = 128

    def input_columns(self) -> list[str]:
        return [self.tokens]

    def target_columns(self) -> list[str]:
        return [self.tags]

    def words_of(self, row: Mapping[str, Any]) -> list[str]:
        return [str(w) for w in row[self.tokens]]

    def tags_of(self, row: Mapping[str, Any]) -> list[str]:
        """The row's tags, stray whitespace stripped (conlleval splits lines at whitespace, so
        ``"B-PER "`` from a JSON file is the tag ``B-PER``)."""
        return [str(t).strip() for t in row[self.tags]]

    def learn_labels(self, train_records: Sequence[dict]) -> list[str]:
        if self.labels:
            return at_least_two([str(x).strip() for x in self.labels], "tag(s) in task.labels:")
        seen = {t for r in train_records for t in self.tags_of(r)}
        labels = (["O"] if "O" in seen else []) + sorted(seen - {"O"})
        return at_least_two(labels, "tag(s) in the train data:")

    def check_records(
        self,
        records: Sequence[dict],
        split: str,
        need_targets: bool,
        labels: Sequence[str] | None = None,
    ) -> list[str]:
        problems = super().check_records(records, split, need_targets, labels)
        if problems or not need_targets:
            return problems
        for i, row in enumerate(records):
            words, tags = row[self.tokens], row[self.tags]
            if not isinstance(words, list) or not isinstance(tags, list):
                return [
                    f"data.{split}: row {i}: '{self.tokens}' and '{self.tags}' must be lists "
                    f"(one entry per word); read token files as CoNLL (.conll)"
                ]
            if len(words) != len(tags):
                return [f"data.{split}: row {i} has {len(words)} words but {len(tags)} tags"]
        labels = labels or ([str(x).strip() for x in self.labels] if self.labels else None)
        if labels is not None:
            unknown = sorted({t for r in records for t in self.tags_of(r)} - set(labels))
            if unknown:
                return [f"data.{split}: tag(s) {unknown[:5]} are not in task.labels {list(labels)}"]
        return []

    def input_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The words of the tokens column (a list, or a string split at whitespace) or of a
        ``--prompt`` text."""
        words = row.get(self.tokens, row.get("text"))
        if words is None:
            raise ValueError(
                f"the tagger reads the words of column {self.tokens!r} (or 'text'); give them"
            )
        return {self.tokens: words.split() if isinstance(words, str) else list(words)}


class TokenClassification(Task):
    """``task.type: token_cls``."""

    Options = TokenClsOptions
    best_metric = "f1"

    def encode(self, records: Sequence[dict], with_targets: bool = True) -> list[dict[str, Any]]:
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                "token_cls needs a fast tokenizer (it maps sub-word tokens back to words); "
                "use a model folder with tokenizer.json, or set model.tokenizer to one"
            )
        options: TokenClsOptions = self.options
        enc = self.tokenizer(
            [options.words_of(r) for r in records],
            is_split_into_words=True,
            truncation=True,
            max_length=options.max_length,
        )
        index = {tag: i for i, tag in enumerate(self.labels or [])}
        features = []
        for i, ids in enumerate(enc["input_ids"]):
            feature: dict[str, Any] = {"input_ids": list(ids)}
            if "token_type_ids" in enc:
                feature["token_type_ids"] = list(enc["token_type_ids"][i])
            firsts, previous = [], None  # positions of each word's first token
            for pos, word in enumerate(enc.word_ids(i)):
                if word is not None and word != previous:
                    firsts.append(pos)
                previous = word
            feature["first_tokens"] = firsts
            if with_targets:
                labels = [IGNORE_INDEX] * len(ids)
                for pos, tag in zip(firsts, options.tags_of(records[i])):
                    labels[pos] = index[tag]
                feature["labels"] = labels
            features.append(feature)
        return features

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pad_encoder_inputs(features, self.tokenizer.pad_token_id)
        if "labels" in features[0]:
            batch["labels"] = pad([f["labels"] for f in features], IGNORE_INDEX)  # (B, T)
        return batch

    def decode(
        self, features: Sequence[dict[str, Any]], batch: dict[str, torch.Tensor], outputs: Any
    ) -> list[list[str]]:
        """The tags of the words in view (each word's first token), per sentence."""
        width = batch["input_ids"].shape[1]
        best = input_positions(outputs.logits, width).argmax(-1).tolist()  # (B, T)
        return [[self.labels[row[p]] for p in f["first_tokens"]] for row, f in zip(best, features)]

    def _tags(self, records: Sequence[dict], decoded: Sequence[list[str]]) -> list[list[str]]:
        """One tag per word; words cut off by truncation get ``O``."""
        out = []
        for row, tags in zip(records, decoded):
            n_words = len(self.options.words_of(row))
            out.append(list(tags[:n_words]) + ["O"] * (n_words - len(tags)))
        return out

    def texts(self, records: Sequence[dict], decoded: Sequence[Any]) -> list[str]:
        return [" ".join(tags) for tags in self._tags(records, decoded)]

    def score(
        self, records: Sequence[dict], predictions: Sequence[Any], eval_loss: float
    ) -> EvalResult:
        preds = self._tags(records, predictions)
        refs = [self.options.tags_of(r) for r in records]
        scores = seq_f1(preds, refs)
        # a sentence is right when its entities are (conlleval's chunks: an IOB1 "I-PER" that
        # starts an entity is the IOB2 "B-PER"), not when each tag is spelt the same
        correct = []
        for p, r in zip(preds, refs):
            alone = seq_f1([p], [r])
            correct.append(alone["f1"] == 1.0 or not alone["per_type"])
        flat_pred = [t for p in preds for t in p]
        flat_ref = [t for r in refs for t in r]
        metrics = {
            "f1": scores["f1"],
            "precision": scores["precision"],
            "recall": scores["recall"],
            "accuracy": accuracy(flat_pred, flat_ref),
        }
        return EvalResult(
            metrics=metrics,
            predictions=[" ".join(p) for p in preds],
            references=[" ".join(r) for r in refs],
            rows=list(records),
            correct=correct,
        )

    def baselines(
        self, train_records: Sequence[dict], eval_records: Sequence[dict]
    ) -> dict[str, Any]:
        """Always the most frequent train tag (``O``): token accuracy, and entity F1 = 0."""
        options: TokenClsOptions = self.options
        return majority_baseline(
            [t for r in train_records for t in options.tags_of(r)],
            [t for r in eval_records for t in options.tags_of(r)],
            self.labels,
        )
