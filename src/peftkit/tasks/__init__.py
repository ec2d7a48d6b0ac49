"""Tasks: one module per task, each turning rows into features, batches, metrics.

==============  ==========================================  =========================  ===========
task.type       what                                        model                      metrics
==============  ==========================================  =========================  ===========
causal_lm       plain text, next-token prediction           AutoModelForCausalLM       perplexity
causal_lm_cls   prompt -> label text (RAFT, SMS spam)       AutoModelForCausalLM       accuracy, macro-F1
causal_lm_gen   prompt -> free text (E2E NLG)               AutoModelForCausalLM       ROUGE-L, BLEU
seq_cls         text -> class id, trained head (SST-2)      AutoModelForSeqCls         accuracy, macro-F1
seq2seq         source -> target on T5 / BART               AutoModelForSeq2SeqLM      ROUGE-L, BLEU
token_cls       words -> one tag each, trained head (NER)   AutoModelForTokenCls       entity F1, accuracy
qa              question + context -> answer span (SQuAD)   AutoModelForQuestionAns    SQuAD EM, F1
==============  ==========================================  =========================  ===========
"""

from . import (  # noqa: F401 (register)
    causal_lm,
    causal_lm_cls,
    causal_lm_gen,
    qa,
    seq2seq,
    seq_cls,
    token_cls,
)
from .base import TASKS, EvalContext, EvalResult, Task, register_task
from .template import Template

__all__ = ["TASKS", "EvalContext", "EvalResult", "Task", "Template", "register_task"]
