"""Chat / instruction tuning: conversations rendered with the tokenizer's own chat template,
loss on the assistant's tokens only.

::

    row ──data.chat.conversation (messages | ShareGPT | Alpaca) or task.user/assistant templates
        ──> [{role, content}, ...]
    render(turns[:i], generation prompt) ... render(turns[:i+1])   one cut per assistant turn
    input_ids  [ <system><user ...><assistant header>][ answer 1 <eot>][<user ...><hdr>][ answer 2 <eot>]
    labels     [ -100                             ...][ answer 1 <eot>][ -100       ...][ answer 2 <eot>]

The template is rendered once per prefix of the conversation: the text of assistant turn ``i``
is what ``render(turns[:i+1])`` adds after ``render(turns[:i], add_generation_prompt=True)``,
so the learnt tokens are exactly what the model must write after the prompt it is given at
inference (its end-of-turn token included, so it learns to stop). A template whose renders are
not prefixes of each other (one that rewrites earlier turns) is refused with a clear error.

``packing`` joins short conversations into rows of up to ``max_length`` tokens; position ids
restart at each conversation and no 2-D attention mask is passed, which transformers turns into
a block-diagonal causal mask (each conversation sees only itself), so the loss is that of the
unpacked rows (this needs forwards without a cache: packing sets the model's
``config.use_cache = False``; generation still caches). Evaluation: loss / perplexity of the held-out conversations and, when
``metrics`` are given, the final assistant turn generated greedily and scored
(``exact_match`` / ``f1`` with SQuAD normalisation, ``rouge_l``, ``bleu``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import metrics as M
from ..data.chat import Message, answer_texts, cell_text, conversation, split_answer
from .base import IGNORE_INDEX, EvalContext, EvalResult, Task, TaskOptions, pad
from .causal_lm_cls import truncate_left
from .generation import generate_texts
from .template import Template

CHAT_METRICS = ("exact_match", "f1", "rouge_l", "bleu")


@dataclasses.dataclass
class ChatOptions(TaskOptions):
    """Attributes:
    user: template of the user turn from the row's columns (``"{context} Question: {question}"``);
        without it rows carry ``messages`` / ShareGPT ``conversations`` / Alpaca columns.
    assistant: template of the answer (with ``user``).
    system: a system message put before every conversation that has none.
    chat_template: a Jinja chat template (or a ``.jinja`` file) instead of the tokenizer's.
    max_length: tokens per conversation (longer ones lose their end; the run log counts them).
    max_new_tokens: generation length of evaluated / generated answers.
    metrics: score generated final answers: ``exact_match``, ``f1``, ``rouge_l``, ``bleu``
        (none: evaluation is loss and perplexity only).
    packing: join short conversations into rows of ``max_length`` tokens for training.
    """

    user: str | None = None
    assistant: str | None = None
    system: str | None = None
    chat_template: str | None = None
    max_length: int = 512
    max_new_tokens: int = 64
    metrics: list[str] | None = None
    packing: bool = False

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics or [] if m not in CHAT_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {list(CHAT_METRICS)}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.assistant is not None and self.user is None:
            raise ValueError("task.assistant needs task.user (the templates go together)")

    def input_columns(self) -> list[str]:
        return Template(self.user).fields if self.user else []

    def target_columns(self) -> list[str]:
        return Template(self.assistant).fields if self.assistant else []

    def conversation(self, row: Mapping[str, Any], where: str = "row") -> list[Message]:
        """The row's messages (see :mod:`peftkit.data.chat`)."""
        if self.user is None:
            return conversation(row, system=self.system, where=where)
        cells = {k: cell_text(v) for k, v in row.items()}
        messages = [{"role": "user", "content": Template(self.user).render(cells)}]
        if self.assistant is not None and not Template(self.assistant).missing(list(row)):
            messages.append(
                {"role": "assistant", "content": Template(self.assistant).render(cells)}
            )
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        return messages

    def references(self, row: Mapping[str, Any], answer: Message) -> list[str]:
        """Accepted answers: every SQuAD answer when the template is one answers cell."""
        fields = self.target_columns()
        if len(fields) == 1 and self.assistant == "{" + fields[0] + "}":
            texts = answer_texts(row.get(fields[0]))
            if texts:
                return texts
        return [answer["content"]]

    def check_records(
        self,
        records: Sequence[dict],
        split: str,
        need_targets: bool,
        labels: Sequence[str] | None = None,
    ) -> list[str]:
        problems = super().check_records(records, split, need_targets, labels)
        if problems:
            return problems
        for i, row in enumerate(records):
            try:
                messages = self.conversation(row, where=f"data.{split} row {i + 1}")
            except (ValueError, KeyError) as exc:
                return [str(exc)]
            if need_targets and not any(m["role"] == "assistant" for m in messages):
                return [f"data.{split} row {i + 1}: the conversation has no assistant turn"]
        return []

    def input_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """A ``--prompt`` is one user turn (or fills the user template's one column)."""
        fields = self.input_columns()
        if self.user is not None and all(f in row for f in fields):
            return dict(row)
        if self.user is None and any(
            k in row for k in ("messages", "conversations", "instruction")
        ):
            return dict(row)
        if "text" in row and (self.user is None or len(fields) == 1):
            if self.user is None:
                return {"messages": [{"role": "user", "content": str(row["text"])}]}
            return {fields[0]: row["text"]}
        raise ValueError(
            f"the chat task reads {fields or 'messages'}; give --prompt TEXT or an --input "
            "file with those columns"
        )

    def describe(self, row: Mapping[str, Any]) -> str:
        prompt, _ = split_answer(self.conversation(row))
        return prompt[-1]["content"] if prompt else ""


def load_template(value: str) -> str:
    """A template given inline, or the text of a ``.jinja`` / ``.j2`` file."""
    if value.strip().endswith((".jinja", ".j2")) and "{" not in value:
        path = Path(value.strip()).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"task.chat_template: file not found: {path}")
        return path.read_text(encoding="utf-8")
    return value


def pack(features: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Join features in order into rows of at most ``max_length`` tokens, each conversation
    with its own positions (0, 1, ...); the first label of each is dropped (nothing before it
    in its own conversation predicts it)."""
    rows: list[dict[str, Any]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for f in features:
        n = len(f["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + n > max_length:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += f["input_ids"]
        current["labels"] += [IGNORE_INDEX, *f["labels"][1:]]
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        rows.append(current)
    return rows


class ChatTask(Task):
    """``task.type: chat``: learn the assistant's turns of conversations."""

    Options = ChatOptions
    best_metric = "eval_loss"
    generates = False  # True when metrics are given (set per task)

    def __init__(self, spec: Any, tokenizer: Any, model: torch.nn.Module) -> None:
        super().__init__(spec, tokenizer, model)
        options: ChatOptions = self.options
        template = options.chat_template or getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
        if not template:
            raise ValueError(
                f"the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat "
                "template; set task.chat_template to a Jinja template (or a .jinja file) "
                "that renders `messages`, e.g. the instruct model's own"
            )
        self.template = load_template(template)
        config = getattr(model, "active_peft_config", None)
        if options.packing and config is not None and config.adapts.virtual_tokens:
            raise ValueError(
                "task.packing cannot be used with prompt methods (virtual tokens come before "
                "every row); set task.packing: false"
            )
        if options.packing:
            # transformers reads position restarts as packed rows only when a forward keeps no
            # cache; generation passes use_cache itself, so it still caches
            inner = model.get_base_model() if hasattr(model, "get_base_model") else model
            if getattr(inner, "config", None) is not None:
                inner.config.use_cache = False
        self.metric_names = list(options.metrics or [])
        self.generates = bool(self.metric_names)
        if self.metric_names:
            self.best_metric = self.metric_names[0]

    # --- rendering -------------------------------------------------------------------------
    @functools.lru_cache(maxsize=4096)  # noqa: B019 (a task lives as long as its run)
    def _render_cached(self, key: tuple[tuple[str, str], ...], generation_prompt: bool) -> str:
        messages = [{"role": r, "content": c} for r, c in key]
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            chat_template=self.template,
        )

    def render(self, messages: Sequence[Message], generation_prompt: bool = False) -> str:
        """The conversation as the chat template writes it (a string)."""
        key = tuple((m["role"], m["content"]) for m in messages)
        return self._render_cached(key, generation_prompt)

    def segments(self, messages: Sequence[Message]) -> list[tuple[str, bool]]:
        """The rendered conversation cut into ``(text, is_assistant_turn)`` pieces."""
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], generation_prompt=True) if i else ""
            turn = self.render(messages[: i + 1])
            if not (prompt.startswith(done) and turn.startswith(prompt)):
                raise ValueError(
                    "the chat template does not render a conversation as a prefix of its "
                    "continuation (it rewrites earlier turns), so assistant tokens cannot be "
                    "located; set task.chat_template to a template that appends turns"
                )
            pieces += [(prompt[len(done) :], False), (turn[len(prompt) :], True)]
            done = turn
        rest = self.render(messages)
        if not rest.startswith(done):
            raise ValueError("the chat template rewrites earlier turns; see task.chat_template")
        pieces.append((rest[len(done) :], False))
        return [(text, target) for text, target in pieces if text]

    def tokens(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of a conversation: labels are the assistant turns' ids."""
        ids: list[int] = []
        labels: list[int] = []
        for text, target in self.segments(messages):
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if target else [IGNORE_INDEX] * len(piece)
        return ids, labels

    def prompt_ids(self, messages: Sequence[Message], new_tokens: int) -> list[int]:
        """Token ids of the conversation followed by the assistant's header (what the model
        continues), cut from the left to leave room for ``new_tokens``."""
        text = self.render(messages, generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return truncate_left(list(ids), self.options.max_length - new_tokens, None)

    # --- features --------------------------------------------------------------------------
    def encode(self, records: Sequence[dict], with_targets: bool = True) -> list[dict[str, Any]]:
        options: ChatOptions = self.options
        if not with_targets:
            new = options.max_new_tokens
            prompts = [split_answer(options.conversation(r))[0] for r in records]
            return [{"input_ids": self.prompt_ids(p, new)} for p in prompts]
        features = []
        for row in records:
            ids, labels = self.tokens(options.conversation(row))
            ids, labels = ids[: options.max_length], labels[: options.max_length]
            if any(label != IGNORE_INDEX for label in labels[1:]):
                features.append({"input_ids": ids, "labels": labels})
        return pack(features, options.max_length) if options.packing else features

    def feature_notes(
        self, split: str, records: Sequence[dict], features: Sequence[dict[str, Any]]
    ) -> list[str]:
        options: ChatOptions = self.options
        lengths = [len(self.tokens(options.conversation(r))[0]) for r in records]
        cut = sum(n > options.max_length for n in lengths)
        targets = sum(sum(x != IGNORE_INDEX for x in f["labels"]) for f in features)
        notes = [
            f"{split}: {len(records)} conversations, {sum(lengths)} tokens, {targets} assistant "
            f"tokens learnt" + (f"; packed into {len(features)} rows" if options.packing else "")
        ]
        if cut:
            notes.append(
                f"{split}: {cut} conversation(s) longer than task.max_length={options.max_length} "
                "lost their end (raise task.max_length to keep them)"
            )
        if not options.packing and len(features) < len(records):
            notes.append(
                f"{split}: {len(records) - len(features)} conversation(s) left out: no "
                "assistant token within task.max_length"
            )
        return notes

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [f["input_ids"] for f in features]
        batch = {"input_ids": pad(ids, self.tokenizer.pad_token_id)}  # (B, T)
        if "position_ids" in features[0]:
            # no 2-D mask: transformers reads the restarts as packed sequences (block-diagonal);
            # the padding at each row's end is one more sequence, with no labels
            width = batch["input_ids"].shape[1]
            batch["position_ids"] = torch.stack(
                [
                    torch.as_tensor(f["position_ids"] + list(range(width - len(f["position_ids"]))))
                    for f in features
                ]
            )  # (B, T)
        else:
            batch["attention_mask"] = pad([[1] * len(i) for i in ids], 0)  # (B, T)
        if "labels" in features[0]:
            batch["labels"] = pad([f["labels"] for f in features], IGNORE_INDEX)  # (B, T)
        return batch

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        # the causal loss predicts token t+1 from tokens <= t: the first label is never scored
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    # --- evaluation ------------------------------------------------------------------------
    def _answered(self, records: Sequence[dict]) -> list[tuple[dict, list[Message], list[str]]]:
        """Rows ending with an assistant turn: (row, prompt turns, accepted answers)."""
        out = []
        for row in records:
            prompt, answer = split_answer(self.options.conversation(row))
            if answer is not None:
                out.append((row, prompt, self.options.references(row, answer)))
        return out

    def scored_rows(self, records: Sequence[dict]) -> list[dict]:
        return [row for row, _, _ in self._answered(records)]

    def score(
        self, records: Sequence[dict], predictions: Sequence[Any], eval_loss: float
    ) -> EvalResult:
        if not self.metric_names:
            return EvalResult(metrics={}, predictions=[])
        answered = self._answered(records)
        rows = [row for row, _, _ in answered]
        refs = [r for _, _, r in answered]
        preds = list(predictions)
        return EvalResult(
            metrics=score_answers(self.metric_names, preds, refs),
            predictions=preds,
            references=refs,
            rows=rows,
        )

    def predict(
        self, ctx: EvalContext, records: Sequence[dict], max_new_tokens: int | None = None
    ) -> list[str]:
        """The final answer of each row, generated after its other turns."""
        new = self.options.max_new_tokens if max_new_tokens is None else max_new_tokens
        prompts = [split_answer(self.options.conversation(r))[0] for r in records]
        ids = [self.prompt_ids(p, new) for p in prompts]
        return generate_texts(ctx, self.tokenizer, ids, max_new_tokens=new)

    def reply(self, ctx: EvalContext, messages: Sequence[Message], max_new_tokens: int) -> str:
        """The assistant's next turn after ``messages``."""
        ids = self.prompt_ids(messages, max_new_tokens)
        return generate_texts(ctx, self.tokenizer, [ids], max_new_tokens=max_new_tokens)[0]


def score_answers(
    names: Sequence[str], preds: Sequence[str], refs: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Metrics of generated answers against their accepted answers (best reference counts)."""
    out: dict[str, float] = {}
    if not preds:
        return out
    squad = M.squad_question_scores(list(preds), [list(r) for r in refs])
    for name in names:
        if name == "exact_match":
            out[name] = sum(e for e, _ in squad) / len(squad)
        elif name == "f1":
            out[name] = sum(f for _, f in squad) / len(squad)
        elif name == "rouge_l":
            out[name] = M.rouge_l(list(preds), [list(r) for r in refs])
        elif name == "bleu":
            out[name] = M.bleu(list(preds), [list(r) for r in refs])
    return out


def chat_loop(
    task: ChatTask,
    ctx: EvalContext,
    lines: Iterable[str],
    write: Callable[[str], None],
    max_new_tokens: int | None = None,
    prompt: Callable[[], None] | None = None,
) -> int:
    """An interactive conversation: each line of ``lines`` is a user turn, each answer is
    written; ``/reset`` starts over, ``/exit`` (or the end of input) stops. Returns the number
    of answers given."""
    options: ChatOptions = task.options
    new = max_new_tokens or options.max_new_tokens
    system = [{"role": "system", "content": options.system}] if options.system else []
    messages: list[Message] = list(system)
    answers = 0
    if prompt:
        prompt()
    for line in lines:
        text = line.rstrip("\n")
        command = text.strip()
        if command == "/exit":
            break
        if command == "/reset":
            messages = list(system)
            write("(conversation reset)")
        elif command:
            messages.append({"role": "user", "content": text})
            answer = task.reply(ctx, messages, new)
            messages.append({"role": "assistant", "content": answer})
            write(answer)
            answers += 1
        if prompt:
            prompt()
    return answers


__all__ = ["CHAT_METRICS", "ChatOptions", "ChatTask", "chat_loop", "pack", "score_answers"]
