"""Extractive QA: windows over long contexts, offsets back to characters, decoding across windows,
SQuAD v1 / v2 modes and the no-answer threshold. Expected values are worked out by hand below.

The hand-made tokenizer splits on spaces and adds BERT's specials, so every position is countable::

    question "where is it" (3 tokens)      max_length 12, doc_stride 2
    [CLS] where is it [SEP] <6 context tokens> [SEP]   -> 6 context tokens per window, step 4
    context "one two three ... fourteen" (14 words: c0..c13)
      window 0: c0..c5    window 1: c4..c9    window 2: c8..c13
      context word c of window w sits at position 5 + c - 4w
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from peftkit.metrics import squad_best_threshold, squad_em_f1
from peftkit.tasks import EvalContext, run_eval, task_spec
from peftkit.tasks.qa_decode import WindowAnswers, sentence_overlap_answer

WORDS = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen".split()
CONTEXT = " ".join(WORDS)
# characters of each word, by hand: one(0,3) two(4,7) three(8,13) four(14,18) five(19,23)
# six(24,27) seven(28,33) eight(34,39) nine(40,44) ten(45,48) eleven(49,55) ...
QUESTION = "where is it"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS, *QUESTION.split(), "which", "word"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    """Whitespace word-level fast tokenizer with BERT's pair template and token types."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=t,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def row(answer: str | None, question: str = QUESTION, context: str = CONTEXT) -> dict:
    answers = {"text": [], "answer_start": []}
    if answer is not None:
        answers = {"text": [answer], "answer_start": [context.index(answer)]}
    return {"question": question, "context": context, "answers": answers}


def make_task(tokenizer, **options):
    options = {"type": "qa", "max_length": 12, "doc_stride": 2, **options}
    return task_spec(options).build(tokenizer, None)


# --- windows ---------------------------------------------------------------------------------


def test_long_context_becomes_overlapping_windows_labelled_per_window(tok):
    task = make_task(tok)
    rows = [row("seven eight"), row("six seven"), row("nine ten"), row("two", context="one two")]
    features = task.encode(rows)
    assert [f["row"] for f in features] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert [f["window"] for f in features] == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    w0, w1, w2 = features[:3]
    # the question whole in each window, the context in 6-token pieces sharing 2 tokens
    assert (
        tok.decode(w1["input_ids"]) == "[CLS] where is it [SEP] five six seven eight nine ten [SEP]"
    )
    assert tok.decode(w2["input_ids"]) == (
        "[CLS] where is it [SEP] nine ten eleven twelve thirteen fourteen [SEP]"
    )
    assert w1["token_type_ids"] == [0] * 5 + [1] * 7
    assert w0["spans"][:5] == [None] * 5 and w0["spans"][11] is None
    assert w0["spans"][5:11] == [(0, 3), (4, 7), (8, 13), (14, 18), (19, 23), (24, 27)]
    assert w0["spans"][9:11] == w1["spans"][5:7] == [(19, 23), (24, 27)]  # the stride overlap
    assert w1["spans"][9:11] == w2["spans"][5:7] == [(40, 44), (45, 48)]
    # labels: "seven eight" (c6, c7) only in window 1, at positions 5 + 6 - 4 = 7 and 8
    targets = [(f["start_positions"], f["end_positions"]) for f in features]
    assert targets[:3] == [(0, 0), (7, 8), (0, 0)]
    # "six seven" (c5, c6) straddles window 0's end: only window 1 holds it whole
    assert targets[3:6] == [(0, 0), (6, 7), (0, 0)]
    # "nine ten" (c8, c9) sits in the overlap: both windows 1 and 2 point at it
    assert targets[6:9] == [(0, 0), (9, 10), (5, 6)]
    assert targets[9] == (6, 6)  # the short context: one window, "two" at position 6
    (note,) = task.feature_notes("train", rows, features)
    assert note == (
        "qa train: 10 windows of <= 12 tokens (doc_stride 2) for 4 questions; "
        "3 of them needed more than one window"
    )


def test_stride_and_length_are_checked(tok):
    assert task_spec({"type": "qa"}).options.doc_stride == 128  # max_length 384 // 3
    assert task_spec({"type": "qa", "max_length": 32}).options.doc_stride == 10
    with pytest.raises(ValueError, match="doc_stride .* below task.max_length"):
        make_task(tok, doc_stride=12)
    with pytest.raises(ValueError, match="task.mode must be one of"):
        make_task(tok, mode="v3")
    # 3 question tokens + 3 specials leave 6 context tokens a window: a stride of 6 cannot advance
    with pytest.raises(ValueError, match="holds 6 context tokens, which must be more than"):
        make_task(tok, doc_stride=6).encode([row("two")])
    assert len(make_task(tok, doc_stride=5).encode([row("two")])) == 9  # step 1: c0-5 ... c8-13


def test_offsets_map_wordpieces_back_to_the_exact_characters():
    """The issue's case on MiniLM's tokenizer: two other paragraphs before the question's own,
    so its answer lies beyond the first window; every context token's characters are the token
    itself, and the gold tokens cut out exactly the answer."""
    from transformers import AutoTokenizer

    from peftkit.models import tokenizer_folder

    tok = AutoTokenizer.from_pretrained(tokenizer_folder("minilm-l6"))
    context = (
        "The river Seine flows through Paris before it reaches the sea at Le Havre. "
        "Rouen was the capital of the duchy for centuries, and Monet painted its cathedral. "
        "The Normans gave their name to Normandy, a region in northern France."
    )
    rows = [row("Normandy", "Which region?", context), row("Le Havre", "Where?", context)]
    task = make_task(tok, max_length=32, doc_stride=8)
    features = task.encode(rows)
    first = [f for f in features if f["row"] == 0]
    assert len(first) == 3 and [f["window"] for f in first] == [0, 1, 2]
    for f in features:
        pieces = tok.convert_ids_to_tokens(f["input_ids"])
        for piece, span in zip(pieces, f["spans"]):
            if span is not None:
                assert context[span[0] : span[1]].lower() == piece.removeprefix("##")
    labelled = [f for f in first if f["start_positions"] > 0]
    assert [f["window"] for f in labelled] == [1, 2]  # never the first window
    for f in labelled:
        first_char, last_char = (
            f["spans"][f["start_positions"]][0],
            f["spans"][f["end_positions"]][1],
        )
        assert context[first_char:last_char] == "Normandy"
    havre = [f["window"] for f in features if f["row"] == 1 and f["start_positions"] > 0]
    assert havre == [0]


# --- decoding --------------------------------------------------------------------------------


class TableQA(torch.nn.Module):
    """A stand-in QA model: each token's start / end logit is looked up by its id, so the
    scores of every window are known by hand; the loss is 0."""

    def __init__(self, tok, start: dict[str, float], end: dict[str, float]):
        super().__init__()
        self.start = torch.zeros(len(VOCAB))
        self.end = torch.zeros(len(VOCAB))
        for word, value in start.items():
            self.start[tok.convert_tokens_to_ids(word)] = value
        for word, value in end.items():
            self.end[tok.convert_tokens_to_ids(word)] = value

    def forward(self, input_ids, **_):
        return SimpleNamespace(
            loss=torch.tensor(0.0),
            start_logits=self.start[input_ids],
            end_logits=self.end[input_ids],
        )


def evaluate(task, model, rows):
    ctx = EvalContext(model=model, device=torch.device("cpu"), batch_size=2)
    metrics, result = run_eval(ctx, task, rows, task.encode(rows))
    return metrics, result


def test_best_span_over_all_windows_in_characters(tok):
    """start(seven) + end(eight) = 3 + 2 = 5 exists only in window 1 (c4..c9); window 0's decoy
    one..two scores 2.8 + 2 = 4.8; five..eight scores 4 + 2 = 6 but spans 4 tokens."""
    model = TableQA(
        tok, {"seven": 3.0, "one": 2.8, "five": 4.0}, {"eight": 2.0, "two": 2.0, "five": 0.5}
    )
    rows = [row("seven eight")]
    task = make_task(tok, mode="v1", max_answer_tokens=2)
    metrics, result = evaluate(task, model, rows)
    assert result.predictions == ["seven eight"]
    assert metrics["exact"] == metrics["f1"] == 1.0
    decoded = task.decode(*_one_batch(task, model, rows))
    assert [w.row for w in decoded] == [0, 0, 0]
    # window 1, spans of <= 2 tokens: seven..eight 5, five..five 4.5, five..six 4, seven 3
    assert decoded[1].spans[:4] == ((5.0, 28, 39), (4.5, 19, 23), (4.0, 19, 27), (3.0, 28, 33))
    assert decoded[0].spans[0] == (pytest.approx(4.8), 0, 7)  # window 0: one..two
    assert decoded[2].spans[0][0] == 0.0  # window 2 (c8..c13): nothing but zeros
    # allowing 4-token answers, five..eight (6 > 5) is the answer
    long = make_task(tok, mode="v1", max_answer_tokens=4)
    assert evaluate(long, model, rows)[1].predictions == ["five six seven eight"]


def _one_batch(task, model, rows):
    features = task.encode(rows)
    batch = task.collate(features)
    return features, batch, model(**batch)


def test_v1_always_answers_v2_weighs_the_null_score(tok):
    """Null score = start([CLS]) + end([CLS]) = 3.5 + 3.5 = 7 in every window; the best span
    scores 5, so na = 7 - 5 = 2: v2 abstains at threshold 0, answers at 2.5; v1 answers."""
    model = TableQA(tok, {"seven": 3.0, "[CLS]": 3.5}, {"eight": 2.0, "[CLS]": 3.5})
    rows = [row("seven eight"), row(None)]
    v1 = make_task(tok, mode="v1")
    metrics, result = evaluate(v1, model, rows)
    assert result.predictions == ["seven eight"] and len(result.rows) == 1  # row 1 left out
    assert metrics["f1"] == 1.0
    assert (
        "1 unanswerable questions are left out"
        in v1.feature_notes("eval", rows, v1.encode(rows))[1]
    )
    ctx = EvalContext(model=model, device=torch.device("cpu"), batch_size=4)
    assert v1.predict(ctx, rows) == ["seven eight", "seven eight"]  # test rows: all answered
    v2 = make_task(tok, mode="v2")
    unanswerable = [f for f in v2.encode(rows) if f["row"] == 1]
    assert [(f["start_positions"], f["end_positions"]) for f in unanswerable] == [(0, 0)] * 3
    metrics, result = evaluate(v2, model, rows)
    assert result.predictions == ["", ""]
    assert metrics["HasAns_f1"] == 0.0 and metrics["NoAns_f1"] == 1.0 and metrics["f1"] == 0.5
    # both questions have na = 2: answering both scores 1 + 0, abstaining 0 + 1: no gain
    assert metrics["best_f1"] == 0.5 and metrics["best_f1_thresh"] == -math.inf
    loose = make_task(tok, mode="v2", null_threshold=2.5)
    assert evaluate(loose, model, rows)[1].predictions == ["seven eight", "seven eight"]


def test_v2_threshold_chosen_on_the_split(tok):
    """Three questions with na scores 1 (A: answer partly right), 3 (B: unanswerable), -2 (C:
    right). At threshold 0: A abstains (0), B abstains (1), C answers (1): F1 2/3. Walking up
    the na scores from "abstain everywhere" (1): C +1 -> 2 at -2, A +0.8 -> 2.8 at 1, B -1 -> 1.8:
    best F1 2.8 / 3 at threshold 1. Exact: C +1 -> 2 at -2, A +0, B -1: best 2 / 3 at -2."""
    task = make_task(tok, mode="v2")
    rows = [row("seven eight"), row(None), row("two")]
    decoded = [  # A: "six seven eight" (24, 39) in window 1 of 2; B; C: "two" (4, 7)
        WindowAnswers(0, 6.0, ((3.5, 0, 3),)),
        WindowAnswers(0, 5.0, ((4.0, 24, 39), (1.0, 40, 44))),
        WindowAnswers(1, 3.0, ((0.0, 0, 3),)),
        WindowAnswers(2, 1.0, ((3.0, 4, 7),)),
    ]
    result = task.score(rows, decoded, eval_loss=0.0)
    assert result.predictions == ["", "", "two"]
    m = result.metrics
    assert m["f1"] == pytest.approx(2 / 3) and m["exact"] == pytest.approx(2 / 3)
    assert m["best_f1"] == pytest.approx(2.8 / 3) and m["best_f1_thresh"] == 1.0
    assert m["best_exact"] == pytest.approx(2 / 3) and m["best_exact_thresh"] == -2.0
    # the configured threshold 1 gives that best F1: A answers "six seven eight" (F1 0.8)
    at_one = make_task(tok, mode="v2", null_threshold=1.0).score(rows, decoded, 0.0)
    assert at_one.predictions == ["six seven eight", "", "two"]
    assert at_one.metrics["f1"] == pytest.approx(2.8 / 3)


def test_best_threshold_matches_trying_every_threshold():
    """squad_best_threshold against brute force over every candidate (ties included)."""
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 8)
        na = [rng.choice([-1.0, 0.0, 0.5, 2.0, math.inf]) for _ in range(n)]
        has = [rng.random() < 0.5 for _ in range(n)]
        answered = [rng.choice([0.0, 0.4, 1.0]) if h else rng.choice([0.0, 0.0, 1.0]) for h in has]
        abstained = [0.0 if h else 1.0 for h in has]

        def total(t, na=na, answered=answered, abstained=abstained):
            return sum(a if x <= t else b for x, a, b in zip(na, answered, abstained))

        candidates = [-math.inf, *sorted(set(na))]
        best = max(total(t) for t in candidates)
        score, thresh = squad_best_threshold(na, answered, abstained)
        assert score == pytest.approx(100 * best / n)
        assert total(thresh) == pytest.approx(best)
        assert thresh == min(t for t in candidates if total(t) == pytest.approx(best))


def test_lexical_baseline_picks_the_sentence_with_most_question_words(tok):
    context = "Paris is in France. The Normans gave their name to Normandy. It rains."
    assert sentence_overlap_answer("What did the Normans give their name to?", context) == (
        "The Normans gave their name to Normandy."
    )
    task = make_task(tok, mode="v2")
    rows = [row("Normandy", "Who named Normandy?", context), row(None, "When?", context)]
    base = task.baselines([], rows)
    # row 0: the Normandy sentence (gold "Normandy": P 1/6 R 1 -> F1 2/7); row 1: the first
    # sentence (gold none -> 0); always-"no answer": 0 then 1
    assert base["sentence_overlap_f1"] == pytest.approx((2 / 7) / 2)
    assert base["no_answer_f1"] == 0.5 and base["no_answer_exact"] == 0.5
    assert squad_em_f1(["Normans gave their name to Normandy"], [["Normandy"]])["f1"] == (
        pytest.approx(100 * 2 / 7)
    )
    assert task.spec.check_records([{"question": "q", "context": "c", "answers": "x"}], "eval", 1)


# --- every method that applies runs QA --------------------------------------------------------


def _method_config(method: str):
    from peftkit import (
        AdaLoraConfig,
        LoraConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
    )

    common = {"task_type": "QUESTION_ANS"}
    if method in ("lora", "qlora"):
        return LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], **common)
    if method == "adalora":
        return AdaLoraConfig(
            init_r=6, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=40,
            target_modules=["query", "value"], **common,
        )  # fmt: skip
    if method == "prompt_tuning":
        return PromptTuningConfig(num_virtual_tokens=4, **common)
    if method == "p_tuning":
        return PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16, **common)
    return PrefixTuningConfig(num_virtual_tokens=4, **common)


@pytest.mark.parametrize(
    "method", ["lora", "adalora", "qlora", "prompt_tuning", "p_tuning", "prefix_tuning"]
)
def test_every_method_learns_an_answer_in_the_second_window(tok, method):
    """A tiny random BERT, adapted by each method, learns where "seven eight" is from windowed
    features (the answer only in window 1) and finds it across the windows at evaluation."""
    from peftkit import get_peft_model
    from tiny_models import tiny_model

    torch.manual_seed(0)
    model = tiny_model(
        "bert", "QUESTION_ANS", hidden=64, ffn=64, vocab_size=len(VOCAB), pad_token_id=0
    )
    if method == "qlora":
        from peftkit.quant import prepare_model_for_kbit_training, quantize_model

        quantize_model(model)
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, _method_config(method))
    task = task_spec({"type": "qa", "max_length": 12, "doc_stride": 2, "mode": "v1"}).build(
        tok, peft_model
    )
    rows = [row("seven eight")]
    features = task.encode(rows)
    batch = task.collate(features)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    peft_model.train()
    first = None
    for step in range(40):
        loss = peft_model(**batch).loss
        first = float(loss.detach()) if first is None else first
        loss.backward()
        optimizer.step()
        if method == "adalora":
            peft_model.update_and_allocate(step)
        optimizer.zero_grad()
    assert float(loss.detach()) < first / 4
    ctx = EvalContext(model=peft_model, device=torch.device("cpu"), batch_size=2)
    metrics, result = run_eval(ctx, task, rows, features)
    assert result.predictions == ["seven eight"]
    assert metrics["exact"] == 1.0


def test_the_run_log_counts_questions_that_needed_several_windows(tmp_path, capsys):
    """`peftkit train`: toy contexts are 8 words, the question 1 (no special tokens in the toy
    tokenizer): max_length 8 leaves 7 context tokens a window, so each question takes 2 windows
    (c0..c6, then c5..c7 with doc_stride 2). 90 questions, 12 held out: 78 train, 12 eval."""
    import yaml

    from peftkit.cli import main
    from tiny_runs import base_config, make_model, method_block, write_squad

    config = base_config(
        make_model("bert", tmp_path / "bert"),
        tmp_path / "run",
        {"type": "qa", "max_length": 8, "doc_stride": 2},
        {"train": str(write_squad(tmp_path / "squad.json", n=30)), "eval_size": 12},
        method_block("lora", "bert"),
        epochs=1,
        plots=False,
        tensorboard=False,
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert (
        "qa train: 156 windows of <= 8 tokens (doc_stride 2) for 78 questions; "
        "78 of them needed more than one window"
    ) in log
    assert "qa eval: 24 windows of <= 8 tokens (doc_stride 2) for 12 questions; 12 of them" in log
    assert "plan: 156 train examples" in log
    # the headline and `peftkit eval` put the QA baselines beside the scores
    assert "| baselines: no_answer_f1=" in log and "sentence_overlap_f1=" in log
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert "  baselines: no_answer_f1=" in capsys.readouterr().out
