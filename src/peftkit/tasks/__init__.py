"""Tasks: one module per task, each turning rows into features, batches, predictions, metrics.

:data:`TASK_TYPES` is THE table from a task type to what runs it: the task class (rows ->
features -> metrics), the adapter's :class:`~peftkit.TaskType`, and the transformers Auto class
that loads the model. ``task.type`` in a run config, ``load_base_model(task=...)`` and a bare
adapter's ``task_type`` are all looked up here. What each task does and scores:

==============  ==========================================  ===================
task.type       what                                        metrics
==============  ==========================================  ===================
causal_lm       plain text, next-token prediction           perplexity
causal_lm_cls   prompt -> label text (RAFT, SMS spam)       accuracy, macro-F1
causal_lm_gen   prompt -> free text (E2E NLG)               ROUGE-L, BLEU
chat            conversations, chat template, answers only  perplexity (+ EM, ROUGE-L)
seq_cls         text -> class id, trained head (SST-2)      accuracy, macro-F1
seq2seq         source -> target on T5 / BART               ROUGE-L, BLEU
token_cls       words -> one tag each, trained head (NER)   entity F1, accuracy
qa              question + context -> answer span (SQuAD)   SQuAD EM, F1
image_cls       image -> class id, trained head (CIFAR-10)  accuracy, macro-F1
text_to_image   caption -> image, diffusion UNet (digits)   denoising loss, share recognised
==============  ==========================================  ===================

See :mod:`peftkit.tasks.base` for how a task is built (spec, then task) and evaluated.
"""

from collections.abc import Mapping
from typing import Any

from ..config import ModelFamily, TaskType
from .base import EvalContext, EvalResult, Task, TaskKind, TaskSpec, forward_batches, run_eval
from .causal_lm import CausalLM
from .causal_lm_cls import CausalLMClassification
from .causal_lm_gen import CausalLMGeneration
from .chat import ChatTask
from .image_cls import ImageClassification
from .qa import ExtractiveQA
from .seq2seq import Seq2Seq
from .seq_cls import SequenceClassification
from .template import Template
from .text_to_image import TextToImage
from .token_cls import TokenClassification

_CAUSAL, _SEQ2SEQ = "AutoModelForCausalLM", "AutoModelForSeq2SeqLM"

# The first row of a TaskType is what a bare adapter of that type loads as.
TASK_TYPES: dict[str, TaskKind] = {
    row.name: row
    for row in (
        #        task.type        task class                adapter TaskType          Auto class
        TaskKind("causal_lm",     CausalLM,                 TaskType.CAUSAL_LM,       _CAUSAL),
        TaskKind("causal_lm_cls", CausalLMClassification,   TaskType.CAUSAL_LM,       _CAUSAL),
        TaskKind("causal_lm_gen", CausalLMGeneration,       TaskType.CAUSAL_LM,       _CAUSAL),
        TaskKind("chat",          ChatTask,                 TaskType.CAUSAL_LM,       _CAUSAL,
                 aliases=("instruction",)),
        TaskKind("seq_cls",       SequenceClassification,   TaskType.SEQ_CLS,
                 "AutoModelForSequenceClassification"),
        TaskKind("seq2seq",       Seq2Seq,                  TaskType.SEQ_2_SEQ_LM,    _SEQ2SEQ),
        TaskKind("token_cls",     TokenClassification,      TaskType.TOKEN_CLS,
                 "AutoModelForTokenClassification"),
        TaskKind("qa",            ExtractiveQA,             TaskType.QUESTION_ANS,
                 "AutoModelForQuestionAnswering", aliases=("question_answering",)),
        # no PEFT TaskType: the head goes into modules_to_save by name (as PEFT's example does)
        TaskKind("image_cls",     ImageClassification,      None,
                 "AutoModelForImageClassification", "AutoImageProcessor",
                 aliases=("image_classification",), family=ModelFamily.VISION),
        # a diffusers UNet + text encoder, loaded by the task itself (TextToImage.load_base_model)
        TaskKind("text_to_image", TextToImage,              None,
                 "UNet2DConditionModel", aliases=("text2image", "t2i"),
                 family=ModelFamily.DIFFUSION),
        # model kinds load_base_model loads that no trainer task uses yet
        TaskKind("feature_extraction", None,                TaskType.FEATURE_EXTRACTION,
                 "AutoModel"),
    )
}  # fmt: skip

# task.type -> task class: the rows a run config may name
TASKS: dict[str, type[Task]] = {k: row.task for k, row in TASK_TYPES.items() if row.task}


def task_kind(name: Any) -> TaskKind:
    """The table row for a task type, a TaskType (its first row) or an alias, any case."""
    key = str(getattr(name, "value", name)).lower()
    if key in TASK_TYPES:
        return TASK_TYPES[key]
    for row in TASK_TYPES.values():
        if key in row.aliases or (row.task_type is not None and key == row.task_type.value.lower()):
            return row
    raise ValueError(f"unknown task {name!r}; use one of {sorted(TASK_TYPES)}.")


def task_spec(block: Mapping[str, Any]) -> TaskSpec:
    """The spec of a config's ``task:`` block (``type`` + the task's options); no labels yet.
    TypeError / ValueError name a bad option."""
    options = dict(block)
    kind = TASK_TYPES[options.pop("type")]
    return TaskSpec(kind, kind.task.Options(**options))


__all__ = [
    "TASKS",
    "TASK_TYPES",
    "EvalContext",
    "EvalResult",
    "Task",
    "TaskKind",
    "TaskSpec",
    "Template",
    "forward_batches",
    "run_eval",
    "task_kind",
    "task_spec",
]
