"""Token classification (NER): a tag per word, from a trained head on the encoder's tokens.

Rows are sentences as CoNLL files give them, ``{"tokens": [...], "tags": [...]}``. The distinct
train tags, sorted with ``O`` first (or ``task.labels``), become class ids and the model's
``id2label``. Words are split into sub-word tokens; only each word's first token carries its tag,
the rest (and special tokens) are ignored by the loss, so a word has exactly one prediction::

    words   ["Empire",  "State",       "Building"]       tags  [B-loc, I-loc, I-loc]
    tokens  [CLS] Emp ##ire  State  Build ##ing [SEP]
    labels  -100  B-loc -100 I-loc  I-loc -100  -100

Scored as seqeval / conlleval do: entity-level micro precision, recall and F1 (an entity counts
only with the right span and type), plus token accuracy; next to the always-``O`` baseline.
Words cut off by ``max_length`` are predicted ``O``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ..config import TaskType
from ..metrics import accuracy, seq_f1
from .base import (
    IGNORE_INDEX,
    EvalContext,
    EvalResult,
    Task,
    forward_batches,
    input_positions,
    name_labels,
    pad,
    pad_encoder_inputs,
    register_task,
)
from .scoring import majority_baseline


@dataclasses.dataclass
class TokenClsOptions:
    """``task:`` fields of ``type: token_cls``.

    tokens: the column holding each sentence's words (a list).
    tags: the column holding one tag per word (a list, BIO / BIOES).
    labels: the tags in class-id order (default: ``O`` then the other train tags, sorted).
    max_length: token limit per sentence (sub-word tokens, special tokens included).
    """

    tokens: str = "tokens"
    tags: str = "tags"
    labels: list[str] | None = None
    max_length: int = 128


@register_task
class TokenClassification(Task):
    """``task.type: token_cls``."""

    name = "token_cls"
    model_kind = "token_cls"
    task_type = TaskType.TOKEN_CLS
    Options = TokenClsOptions
    best_metric = "f1"

    def __init__(self, options: TokenClsOptions) -> None:
        super().__init__(options)
        self.labels: list[str] | None = [str(x) for x in options.labels] if options.labels else None
        self._eval_preds: list[list[int]] = []

    def input_columns(self) -> list[str]:
        return [self.options.tokens]

    def target_columns(self) -> list[str]:
        return [self.options.tags]

    def words_of(self, row: dict) -> list[str]:
        return [str(w) for w in row[self.options.tokens]]

    def tags_of(self, row: dict) -> list[str]:
        return [str(t) for t in row[self.options.tags]]

    def fit(self, train_records: Sequence[dict]) -> None:
        if self.labels is None:
            seen = {t for r in train_records for t in self.tags_of(r)}
            self.labels = (["O"] if "O" in seen else []) + sorted(seen - {"O"})
        if len(self.labels) < 2:
            raise ValueError(
                f"token classification needs at least 2 tags; the train data has {self.labels}"
            )

    def check_records(self, records: Sequence[dict], split: str, need_targets: bool) -> list[str]:
        problems = super().check_records(records, split, need_targets)
        if problems or not need_targets:
            return problems
        for i, row in enumerate(records):
            words, tags = row[self.options.tokens], row[self.options.tags]
            if not isinstance(words, list) or not isinstance(tags, list):
                return [
                    f"data.{split}: row {i}: '{self.options.tokens}' and '{self.options.tags}' "
                    f"must be lists (one entry per word); read token files as CoNLL (.conll)"
                ]
            if len(words) != len(tags):
                return [f"data.{split}: row {i} has {len(words)} words but {len(tags)} tags"]
        if self.labels is not None:
            unknown = sorted({t for r in records for t in self.tags_of(r)} - set(self.labels))
            if unknown:
                return [f"data.{split}: tag(s) {unknown[:5]} are not in task.labels {self.labels}"]
        return []

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": len(self.labels or [])}

    def configure_model(self, model: torch.nn.Module) -> None:
        name_labels(model, self.labels)

    def encode(self, records: Sequence[dict], with_targets: bool = True) -> list[dict[str, Any]]:
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                "token_cls needs a fast tokenizer (it maps sub-word tokens back to words); "
                "use a model folder with tokenizer.json, or set model.tokenizer to one"
            )
        enc = self.tokenizer(
            [self.words_of(r) for r in records],
            is_split_into_words=True,
            truncation=True,
            max_length=self.options.max_length,
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
                for pos, tag in zip(firsts, self.tags_of(records[i])):
                    labels[pos] = index[tag]
                feature["labels"] = labels
            features.append(feature)
        return features

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pad_encoder_inputs(features, self.tokenizer.pad_token_id)
        if "labels" in features[0]:
            batch["labels"] = pad([f["labels"] for f in features], IGNORE_INDEX)  # (B, T)
        return batch

    def observe(self, batch: dict[str, torch.Tensor], outputs: Any) -> None:
        keep = batch["labels"] != IGNORE_INDEX  # (B, T): each word's first token
        best = input_positions(outputs.logits, keep.shape[1]).argmax(-1)  # (B, T)
        self._eval_preds.extend(row[mask].tolist() for row, mask in zip(best, keep))

    def _tags(self, ids: list[int], n_words: int) -> list[str]:
        """Tag names for a sentence's words; words cut off by truncation get ``O``."""
        tags = [self.labels[i] for i in ids[:n_words]]
        return tags + ["O"] * (n_words - len(tags))

    def evaluate(self, ctx: EvalContext, records: Sequence[dict], eval_loss: float) -> EvalResult:
        ids = self._eval_preds if len(self._eval_preds) == len(records) else None
        self._eval_preds = []
        if ids is None:
            preds = self.predict_tags(ctx, records)
        else:
            preds = [self._tags(p, len(self.words_of(r))) for p, r in zip(ids, records)]
        refs = [self.tags_of(r) for r in records]
        scores = seq_f1(preds, refs)
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
        )

    def predict_tags(self, ctx: EvalContext, records: Sequence[dict]) -> list[list[str]]:
        """One tag per word for each row (rows need no tags)."""
        features = self.encode(records, with_targets=False)
        out: list[list[str]] = []
        for piece, batch, outputs in forward_batches(ctx, self, features):
            width = batch["input_ids"].shape[1]
            best = input_positions(outputs.logits, width).argmax(-1).tolist()  # (B, T)
            for row, i in zip(best, piece):
                ids = [row[pos] for pos in features[i]["first_tokens"]]
                out.append(self._tags(ids, len(self.words_of(records[i]))))
        return out

    def predict(self, ctx: EvalContext, records: Sequence[dict]) -> list[str]:
        return [" ".join(tags) for tags in self.predict_tags(ctx, records)]

    def baselines(
        self, train_records: Sequence[dict], eval_records: Sequence[dict]
    ) -> dict[str, Any]:
        """Always the most frequent train tag (``O``): token accuracy, and entity F1 = 0."""
        return majority_baseline(
            [t for r in train_records for t in self.tags_of(r)],
            [t for r in eval_records for t in self.tags_of(r)],
            self.labels,
        )
