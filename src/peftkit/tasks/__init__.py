"""Tasks: one module per task, each turning rows into features, batches, predictions, metrics.

:data:`TASKS` pairs each row of the task table (:data:`peftkit.task_types.TASK_TYPES`: the
adapter's :class:`~peftkit.TaskType`, the Auto class that loads the model, its model family)
that a run config may name with its task class (rows -> features -> metrics); the table itself
is plain data below ``models.py``, which loads by it. What each task does and scores:

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
text_to_image   caption -> image, SD folder / pixel UNet    denoising loss, share recognised
==============  ==========================================  ===================

See :mod:`peftkit.tasks.base` for how a task is built (spec, then task) and evaluated.
"""

from collections.abc import Mapping
from typing import Any

from ..task_types import TASK_TYPES, TaskKind, task_kind
from .base import EvalContext, EvalResult, Task, TaskSpec, forward_batches, run_eval
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

# task.type -> task class: the rows of the task table (peftkit.task_types) a run config may name
TASKS: dict[str, type[Task]] = {
    "causal_lm": CausalLM,
    "causal_lm_cls": CausalLMClassification,
    "causal_lm_gen": CausalLMGeneration,
    "chat": ChatTask,
    "seq_cls": SequenceClassification,
    "seq2seq": Seq2Seq,
    "token_cls": TokenClassification,
    "qa": ExtractiveQA,
    "image_cls": ImageClassification,
    "text_to_image": TextToImage,
}


def task_spec(block: Mapping[str, Any]) -> TaskSpec:
    """The spec of a config's ``task:`` block (``type`` + the task's options); no labels yet.
    TypeError / ValueError name a bad option."""
    options = dict(block)
    kind = TASK_TYPES[options.pop("type")]
    task = TASKS[kind.name]
    return TaskSpec(kind, task, task.Options(**options))


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
