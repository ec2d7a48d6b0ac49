"""Image classification: an image -> one of N labels, with a trained head.

::

    rows {image: path | array, label}  (image folders, CSV/JSONL of paths, MNIST idx)
      ──encode──> each image read once (uint8, the model's channel count; a bad file is an
                  error naming it) + class id
      ──collate──> pixel_values (B, C, H, W) by the model's own preprocessing (size, mean, std
                   from its processor config); while the model trains: random crop + flip
      ──model──> logits (B, N) ──argmax──> label ──> accuracy, macro-F1, per-class accuracy

The label column's distinct values, sorted (or ``task.labels``), become class ids and the
model's ``id2label``; the classifier head (``classifier``, or a plain model's own, e.g.
EfficientNet's ``_fc``) is resized to them, trains in full beside the adapter and is saved with
it (``modules_to_save``). Prompt-learning methods need token embeddings: the task's row is a
``vision`` model, which the method table says they do not serve.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from .base import TaskOptions, TaskSpec
from .classifier import LabelClassifier, learn_label_set, unknown_label_problems

MAX_CLASS_METRICS = 30  # per-class accuracy goes into the metrics up to this many classes


@dataclasses.dataclass
class ImageClsOptions(TaskOptions):
    """Attributes:
    image: the column holding an image path (or an array, as MNIST's idx rows do).
    label: the label column.
    labels: the label values in class-id order (default: sorted distinct train values).
    image_root: folder that relative image paths start from (default: the working directory).
    augment: random crop + horizontal flip while training (never at evaluation).
    flip: with ``augment``, flip half the images left-right (turn off for digits and text).
    crop_scale: with ``augment``, the smallest crop as a fraction of the image's area (1: none).
    image_size: side the model reads instead of its processor's (e.g. 160 to train a 224-pixel
        CNN faster on 32-pixel CIFAR); the processor's mean and std stay.
    """

    head_per_label: ClassVar[bool] = True

    image: str = "image"
    label: str = "label"
    labels: list[str] | None = None
    image_root: str | None = None
    augment: bool = True
    flip: bool = True
    crop_scale: float = 0.8
    image_size: int | None = None

    def __post_init__(self) -> None:
        if not 0.05 <= float(self.crop_scale) <= 1.0:
            raise ValueError(f"crop_scale must be in [0.05, 1], got {self.crop_scale}")
        if self.image_size is not None and int(self.image_size) < 1:
            raise ValueError(f"image_size must be a positive side in pixels, got {self.image_size}")

    def input_columns(self) -> list[str]:
        return [self.image]

    def target_columns(self) -> list[str]:
        return [self.label]

    def label_of(self, row: Mapping[str, Any]) -> str:
        return str(row[self.label])

    def learn_labels(self, train_records: Sequence[dict]) -> list[str]:
        return learn_label_set(self, train_records, sort_key=_natural)

    def check_records(
        self,
        records: Sequence[dict],
        split: str,
        need_targets: bool,
        labels: Sequence[str] | None = None,
    ) -> list[str]:
        problems = super().check_records(records, split, need_targets, labels)
        if problems and self.image == "image" and records and "path" in records[0]:
            problems[-1] += "; the images are in column 'path': set task.image: path"
        if problems or not need_targets:
            return problems
        return unknown_label_problems(self, records, split, labels)

    def input_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """``generate --image a.png`` gives ``{"image": "a.png"}``; input files need the column."""
        if self.image in row:
            return dict(row)
        if "image" in row:
            return {self.image: row["image"]}
        raise ValueError(f"the model reads images from column {self.image!r}; give --image FILE")

    def describe(self, row: Mapping[str, Any]) -> str:
        value = row[self.image]
        return str(value) if isinstance(value, str) else f"<image {getattr(value, 'shape', '')}>"


def _natural(label: str) -> tuple[int, Any]:
    """Digits sort as numbers (2 < 10), other labels as text."""
    return (0, int(label)) if label.lstrip("-").isdigit() else (1, label)


class ImageClassification(LabelClassifier):
    """``task.type: image_cls``."""

    Options = ImageClsOptions

    @staticmethod
    def trained_heads(model: torch.nn.Module) -> list[str]:
        """The head to train in full and save with the adapter (``modules_to_save``):
        transformers' ``classifier``, a plain model's own (EfficientNet's ``_fc``), else the
        last Linear layer with one output per label."""
        from ..vision import head_name

        if isinstance(getattr(model, "classifier", None), torch.nn.Module):
            return ["classifier"]
        if (name := head_name(model)) is not None:
            return [name]
        n = getattr(getattr(model, "config", None), "num_labels", None)
        linears = [k for k, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                   and m.out_features == n]  # fmt: skip
        if not linears:
            raise ValueError(
                f"{type(model).__name__}: no classifier head found; set method.modules_to_save"
            )
        return linears[-1:]

    def __init__(self, spec: TaskSpec, processor: Any, model: torch.nn.Module) -> None:
        from ..vision import ImagePreprocessing

        self.spec = spec
        self.options: ImageClsOptions = spec.options
        self.labels = list(spec.labels) if spec.labels is not None else None
        self.tokenizer = processor  # the image processor (what load_base_model returns)
        self.model = model
        channels = _channels(model)
        if isinstance(processor, ImagePreprocessing):
            self.preprocess = dataclasses.replace(processor, channels=channels)
        else:
            self.preprocess = ImagePreprocessing.from_processor(processor, channels)
        if self.options.image_size:
            side, pre = int(self.options.image_size), self.preprocess
            edge = pre.shortest_edge and round(pre.shortest_edge * side / min(pre.size))
            self.preprocess = dataclasses.replace(pre, size=(side, side), shortest_edge=edge)

    # --- features --------------------------------------------------------------------------
    def encode(self, records: Sequence[dict], with_targets: bool = True) -> list[dict[str, Any]]:
        from ..vision import read_image

        index = {label: i for i, label in enumerate(self.labels or [])}
        features = []
        for row in records:
            image = read_image(
                row[self.options.image], self.preprocess.channels, self.options.image_root
            )
            feature: dict[str, Any] = {"image": image}  # uint8 (H, W, C)
            if with_targets:
                feature["labels"] = index[self.options.label_of(row)]
            features.append(feature)
        return features

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        opts = self.options
        augment = opts.augment and self.model.training  # evaluation never augments
        pixels = [
            self.preprocess(f["image"], augment=augment, flip=opts.flip, crop_scale=opts.crop_scale)
            for f in features
        ]
        batch = {"pixel_values": torch.stack(pixels)}  # (B, C, H, W)
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features])  # (B,)
        return batch

    def feature_notes(
        self, split: str, records: Sequence[dict], features: Sequence[dict[str, Any]]
    ) -> list[str]:
        shapes = {f["image"].shape[:2] for f in features}
        size = "x".join(map(str, self.preprocess.size))
        sizes = "x".join(map(str, next(iter(shapes)))) if len(shapes) == 1 else "mixed sizes"
        aug = (
            f"; training augmentation: crop >= {self.options.crop_scale:g} of the area"
            + (", horizontal flip" if self.options.flip else "")
            if self.options.augment and split == "train"
            else ""
        )
        return [f"{split}: {len(features)} images ({sizes}) -> {size}, {self.preprocess.channels} "
                f"channel(s), mean {self.preprocess.mean}, std {self.preprocess.std}{aug}"]  # fmt: skip

    # --- predictions and scores ------------------------------------------------------------
    def label_metrics(self, preds: list[str], refs: list[str]) -> dict[str, float]:
        from .. import metrics as M

        metrics = super().label_metrics(preds, refs)
        if self.labels and len(self.labels) <= MAX_CLASS_METRICS:
            per_class = M.per_class_accuracy(preds, refs, self.labels)
            metrics.update({f"class_acc/{k}": v for k, v in per_class.items() if v is not None})
        return metrics

    def printable_rows(self, records: Sequence[dict]) -> list[dict[str, Any]]:
        return [_printable(r, self.options.image) for r in records]


def _printable(row: Mapping[str, Any], column: str) -> dict[str, Any]:
    """A row for the predictions CSV: an in-memory image (idx rows) becomes its row shape."""
    value = row.get(column)
    if value is None or isinstance(value, str):
        return dict(row)
    return {**row, column: f"<array {'x'.join(map(str, getattr(value, 'shape', ())))}>"}


def _channels(model: torch.nn.Module) -> int:
    """The channel count the model reads (its config's ``num_channels``, else 3)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return int(getattr(getattr(base, "config", None), "num_channels", None) or 3)
