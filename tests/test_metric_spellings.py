"""Every metric path scores a right answer right, in any spelling its official metric accepts.

For each task's scoring (token classification, seq2seq / conditional generation, extractive QA,
text-to-image's judged labels, the trained-head classifiers) a correct prediction arrives in a
variant spelling: stray whitespace in label files, IOB1 or BIOES instead of IOB2 tags, a
reference with the template's spacing, other case where the metric folds case, SQuAD answers
with articles and punctuation. Each must count as right in the metrics and in the predictions
CSV's ``correct`` column, as the reference implementation (seqeval, rouge-score, sacrebleu,
scikit-learn, the official SQuAD script's normalisation) scores it.
"""

from __future__ import annotations

import csv
import re
import string
from collections import Counter
from pathlib import Path

import pytest

from peftkit.tasks import task_spec
from peftkit.tasks.qa_decode import WindowAnswers
from peftkit.tasks.text_to_image import TextToImage, TextToImageOptions
from peftkit.train.evaluate import SplitEvaluation
from tiny_runs import make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def csv_correct(result, rows, tmp_path: Path) -> list[str]:
    """The predictions CSV's ``correct`` column for ``result``."""
    evaluation = SplitEvaluation("eval", list(rows), result.metrics, result, None, 0.0)
    path = evaluation.write_predictions(tmp_path / "predictions.csv")
    with open(path, newline="", encoding="utf-8") as fh:
        return [r["correct"] for r in csv.DictReader(fh)]


# --- token classification ------------------------------------------------------------------


def token_task(tok, rows):
    return task_spec({"type": "token_cls"}).fit(rows).build(tok, None)


def test_token_tags_with_stray_whitespace_are_the_tags(tok, tmp_path):
    from seqeval.metrics import f1_score

    # JSON rows keep whatever the file had; conlleval splits lines at whitespace
    rows = [
        {"tokens": ["Alpha", "serves", "thai"], "tags": ["B-name ", "O", " B-food"]},
        {"tokens": ["Bravo", "serves", "french"], "tags": ["B-name", "O\t", "B-food"]},
    ]
    task = token_task(tok, rows)
    assert task.labels == ["O", "B-food", "B-name"]
    preds = [["B-name", "O", "B-food"], ["B-name", "O", "B-food"]]
    result = task.score(rows, preds, eval_loss=0.0)
    gold = [[t.split()[0] for t in r["tags"]] for r in rows]  # as conlleval reads them
    assert result.metrics["f1"] == f1_score(gold, preds) == 1.0
    assert result.metrics["accuracy"] == 1.0
    assert csv_correct(result, rows, tmp_path) == ["true", "true"]


@pytest.mark.parametrize(
    ("gold", "pred"),
    [
        # IOB1 (CoNLL-2003's original): I- opens an entity, B- only between two of a type
        (
            ["I-name", "I-name", "O", "I-food", "B-food"],
            ["B-name", "I-name", "O", "B-food", "B-food"],
        ),
        # BIOES gold, BIO prediction of the same entities
        (["B-name", "E-name", "O", "S-food", "O"], ["B-name", "I-name", "O", "B-food", "O"]),
    ],
    ids=["iob1_gold_iob2_pred", "bioes_gold_bio_pred"],
)
def test_tag_scheme_variants_of_the_same_entities_are_right(tok, tmp_path, gold, pred):
    from seqeval.metrics import f1_score

    rows = [{"tokens": ["Alpha", "Bravo", "serves", "thai", "french"], "tags": gold}]
    task = token_task(tok, rows)
    result = task.score(rows, [pred], eval_loss=0.0)
    assert result.metrics["f1"] == f1_score([gold], [pred]) == 1.0
    assert csv_correct(result, rows, tmp_path) == ["true"]
    # a sentence with a wrong entity is still wrong
    wrong = ["B-name", "I-name", "O", "B-food", "I-food"]
    result = task.score(rows, [wrong], eval_loss=0.0)
    assert result.metrics["f1"] == pytest.approx(f1_score([gold], [wrong]))
    assert csv_correct(result, rows, tmp_path) == ["false"]


# --- seq2seq / conditional generation --------------------------------------------------------

E2E = [
    {"mr": "name[Alpha] , food[thai]", "ref": "Alpha serves thai food, near the river."},
    {"mr": "name[Bravo] , food[french]", "ref": "Bravo serves french food."},
]


@pytest.mark.parametrize("kind", ["seq2seq", "causal_lm_gen"])
def test_generated_text_against_references_with_template_spacing(tok, tmp_path, kind):
    import sacrebleu
    from rouge_score import rouge_scorer

    # the references carry the template's spacing and a newline; generation strips its text
    task = task_spec({"type": kind, "text": "{mr} :", "target": " {ref}\n"}).build(tok, None)
    refs = [" " + r["ref"] + "\n" for r in E2E]
    preds = [r["ref"] for r in E2E]
    result = task.score(E2E, preds, eval_loss=0.0)
    assert result.references == [[r] for r in refs]
    assert (
        result.metrics["bleu"]
        == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
        == pytest.approx(100.0)
    )
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert (
        result.metrics["rouge_l"]
        == pytest.approx(1.0)
        == pytest.approx(scorer.score(refs[0], preds[0])["rougeL"].fmeasure)
    )
    assert csv_correct(result, E2E, tmp_path) == ["true", "true"]


def test_rouge_folds_case_and_punctuation_and_bleu_keeps_case(tok):
    import sacrebleu
    from rouge_score import rouge_scorer

    task = task_spec({"type": "seq2seq", "text": "{mr}", "target": "{ref}"}).build(tok, None)
    preds = ["ALPHA serves Thai food near the river", "bravo  serves french food"]
    result = task.score(E2E, preds, eval_loss=0.0)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    want = sum(scorer.score(r["ref"], p)["rougeL"].fmeasure for r, p in zip(E2E, preds)) / 2
    assert result.metrics["rouge_l"] == pytest.approx(want) == pytest.approx(1.0)
    # sacrebleu is case-sensitive by default: the case variant is not a perfect BLEU there
    refs = [r["ref"] for r in E2E]
    assert result.metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert result.metrics["bleu"] < 100.0


def test_seq2seq_labels_compare_as_labels(tok, tmp_path):
    rows = [{"s": "the food was great", "l": "Positive "}, {"s": "awful", "l": "negative"}]
    task = task_spec(
        {"type": "seq2seq", "text": "{s}", "target": "{l}", "labels": ["positive", "negative"],
         "label_match": "casefold"}
    ).fit(rows).build(tok, None)  # fmt: skip
    result = task.score(rows, ["positive", "NEGATIVE"], eval_loss=0.0)
    assert result.metrics["accuracy"] == 1.0 and result.metrics["invalid_rate"] == 0.0
    assert result.predictions == ["positive", "negative"]
    assert csv_correct(result, rows, tmp_path) == ["true", "true"]


# --- extractive QA ---------------------------------------------------------------------------


def official_normalize_answer(s: str) -> str:
    """The official SQuAD v1.1 / v2.0 evaluation script's ``normalize_answer``."""

    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text, flags=re.UNICODE)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def official_f1(prediction: str, gold: str) -> float:
    p, g = official_normalize_answer(prediction).split(), official_normalize_answer(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g:
        return float(p == g)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize("mode", ["v1", "v2"])
def test_squad_answers_in_the_spellings_the_official_script_accepts(tok, tmp_path, mode):
    contexts = [
        "Paris has The Eiffel Tower. It is tall.",
        "The river is the  Seine, in France.",
        "It opened in 1889 after two years.",
    ]
    golds = ["Eiffel Tower", "Seine", "in 1889"]
    spans = ["The Eiffel Tower.", "the  Seine,", "In 1889"]  # articles, punctuation, spaces
    rows = [
        {"question": "q", "context": c, "answers": {"text": [g], "answer_start": [c.find(g)]}}
        for c, g in zip(contexts, golds)
    ]
    task = task_spec({"type": "qa", "mode": mode}).build(tok, None)
    decoded = []
    for i, (context, span) in enumerate(zip(contexts, spans)):
        start = context.lower().find(span.lower())
        decoded.append(WindowAnswers(i, null_score=-10.0, spans=((5.0, start, start + len(span)),)))
    result = task.score(rows, decoded, eval_loss=0.0)
    assert [p.lower() for p in result.predictions] == [s.lower() for s in spans]
    for pred, gold in zip(result.predictions, golds):
        assert official_normalize_answer(pred) == official_normalize_answer(gold)
        assert official_f1(pred, gold) == 1.0
    assert result.metrics["exact"] == result.metrics["f1"] == 1.0
    assert csv_correct(result, rows, tmp_path) == ["true"] * 3


# --- text-to-image: judged labels ------------------------------------------------------------


def test_judged_labels_compare_without_stray_whitespace(tmp_path):
    task = TextToImage.__new__(TextToImage)  # scoring only: no UNet needed
    task.options = TextToImageOptions(
        caption_template="a handwritten {label}", samples_per_prompt=2
    )
    task.judge = object()  # a judge is configured (its labels are the predictions below)
    rows = [{"image": "x.png", "label": " 7"}, {"image": "y.png", "label": 3}]
    scored = task.scored_rows(rows)
    assert [r["label"] for r in scored] == ["7", "7", "3", "3"]
    result = task.score(rows, ["7", "7", "3", "8"], eval_loss=0.0)
    assert result.metrics["recognised"] == 0.75
    assert result.metrics["recognised/7"] == 1.0 and result.metrics["recognised/3"] == 0.5
    assert csv_correct(result, scored, tmp_path) == ["true", "true", "true", "false"]


# --- trained-head classifiers ----------------------------------------------------------------


def test_classifier_labels_with_stray_whitespace_are_one_class(tok):
    from sklearn.metrics import accuracy_score

    rows = [
        {"text": "great", "label": "positive"},
        {"text": "awful", "label": " negative"},
        {"text": "nice", "label": "positive "},
        {"text": "rude", "label": "negative"},
    ]
    spec = task_spec({"type": "seq_cls"}).fit(rows)
    assert spec.labels == ("negative", "positive")
    task = spec.build(tok, None)
    preds = ["positive", "negative", "positive", "negative"]
    result = task.score(rows, preds, eval_loss=0.0)
    gold = [r["label"].strip() for r in rows]
    assert result.metrics["accuracy"] == accuracy_score(gold, preds) == 1.0
