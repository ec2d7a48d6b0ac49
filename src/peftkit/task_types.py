"""THE task table: a task type -> the model it adapts. Plain data, below ``models.py`` and ``tasks/``.

``task.type`` in a run config, ``load_base_model(task=...)`` and a bare adapter's ``task_type``
are all looked up here. ``models.py`` reads a row's Auto class, preprocessor and model family to
load the base model; :mod:`peftkit.tasks` pairs each row a run can name with its task class
(``tasks.TASKS``); the method table asks the family (a method applies when it serves it). Rows
hold names and enums only, so anything may import this module without importing the tasks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import ModelFamily, TaskType


@dataclasses.dataclass(frozen=True)
class TaskKind:
    """One row of the task table.

    Attributes:
        name: ``task.type`` in a run config, and the ``task=`` name ``load_base_model`` takes.
        task_type: the adapter config's :class:`peftkit.TaskType` (None: PEFT has none).
        auto_class: the class that loads the model (a transformers Auto class, or diffusers').
        preprocessor: the transformers Auto class that loads its tokenizer / image processor.
        aliases: other spellings ``load_base_model`` accepts.
        family: the kind of base model: ``models.py`` loads each family its own way (vision:
            plain PyTorch networks first; diffusion: a UNet folder), and a method applies
            when it serves the family.
    """

    name: str
    task_type: TaskType | None
    auto_class: str
    preprocessor: str = "AutoTokenizer"
    aliases: tuple[str, ...] = ()
    family: ModelFamily = ModelFamily.TEXT

    @property
    def has_head(self) -> bool:
        """Whether the model puts a per-label head on the encoder (``num_labels`` applies)."""
        return self.auto_class.endswith("Classification")

    @property
    def reads_images(self) -> bool:
        """Whether the model's inputs are images (``generate --image`` applies)."""
        return self.preprocessor == "AutoImageProcessor"

    @property
    def writes_text(self) -> bool:
        """Whether the model generates text (a causal or sequence-to-sequence LM)."""
        return self.auto_class in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM")

    @property
    def writes_images(self) -> bool:
        """Whether the model generates images (``generate`` writes PNGs): a diffusion model."""
        return self.family is ModelFamily.DIFFUSION


_CAUSAL, _SEQ2SEQ = "AutoModelForCausalLM", "AutoModelForSeq2SeqLM"

# The first row of a TaskType is what a bare adapter of that type loads as.
TASK_TYPES: dict[str, TaskKind] = {
    row.name: row
    for row in (
        #        task.type        adapter TaskType          Auto class
        TaskKind("causal_lm",     TaskType.CAUSAL_LM,       _CAUSAL),
        TaskKind("causal_lm_cls", TaskType.CAUSAL_LM,       _CAUSAL),
        TaskKind("causal_lm_gen", TaskType.CAUSAL_LM,       _CAUSAL),
        TaskKind("chat",          TaskType.CAUSAL_LM,       _CAUSAL, aliases=("instruction",)),
        TaskKind("seq_cls",       TaskType.SEQ_CLS,         "AutoModelForSequenceClassification"),
        TaskKind("seq2seq",       TaskType.SEQ_2_SEQ_LM,    _SEQ2SEQ),
        TaskKind("token_cls",     TaskType.TOKEN_CLS,       "AutoModelForTokenClassification"),
        TaskKind("qa",            TaskType.QUESTION_ANS,    "AutoModelForQuestionAnswering",
                 aliases=("question_answering",)),
        # no PEFT TaskType: the head goes into modules_to_save by name (as PEFT's example does)
        TaskKind("image_cls",     None,                     "AutoModelForImageClassification",
                 "AutoImageProcessor", aliases=("image_classification",),
                 family=ModelFamily.VISION),
        # a diffusers UNet + text encoder (peftkit.diffusion loads it)
        TaskKind("text_to_image", None,                     "UNet2DConditionModel",
                 aliases=("text2image", "t2i"), family=ModelFamily.DIFFUSION),
        # model kinds load_base_model loads that no trainer task uses yet
        TaskKind("feature_extraction", TaskType.FEATURE_EXTRACTION, "AutoModel"),
    )
}  # fmt: skip


def task_kind(name: Any) -> TaskKind:
    """The table row for a task type, a TaskType (its first row) or an alias, any case."""
    key = str(getattr(name, "value", name)).lower()
    if key in TASK_TYPES:
        return TASK_TYPES[key]
    for row in TASK_TYPES.values():
        if key in row.aliases or (row.task_type is not None and key == row.task_type.value.lower()):
            return row
    raise ValueError(f"unknown task {name!r}; use one of {sorted(TASK_TYPES)}.")


__all__ = ["TASK_TYPES", "TaskKind", "task_kind"]
