"""Conditional generation on a causal LM: prompt -> free text (E2E NLG: meaning representation
-> restaurant description), scored by ROUGE-L and BLEU against the references.

Training is the same as for classification-as-generation (prompt masked out of the loss, target +
EOS learnt); rows that share a prompt are generated once and scored against all their references.
"""

from __future__ import annotations

import dataclasses

from .causal_lm_cls import PromptedCausalLM
from .prompted import PromptedOptions


@dataclasses.dataclass
class CausalLMGenerationOptions(PromptedOptions):
    """See :class:`PromptedOptions`; default metrics ROUGE-L then BLEU."""

    target: str = "{target}"


class CausalLMGeneration(PromptedCausalLM):
    """``task.type: causal_lm_gen``: generate a text after a prompt."""

    Options = CausalLMGenerationOptions
