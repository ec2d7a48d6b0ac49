"""Classification as generation is scored as the user means the labels (issue 24).

A target template's spacing (" {label}"), a trailing newline, EOS text written into the target
and (with ``label_match: casefold``) case must not turn a right answer into a wrong or "invalid"
one; labels that share words stay apart; reports, the predictions CSV and the majority baseline
show the label, not the template's spelling of it. Each case goes through the task as a run does
(spec fitted on train rows, predictions as generation decodes them: special tokens skipped,
whitespace stripped), then through the CSV writer.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from peftkit.tasks import task_spec
from peftkit.train.evaluate import SplitEvaluation
from tiny_runs import make_tokenizer

ROWS = [
    {"review": "the food was great", "label": "positive"},
    {"review": "staff very rude", "label": "negative"},
    {"review": "lovely", "label": "positive"},
    {"review": "awful", "label": "negative"},
    {"review": "nice", "label": "positive"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def fitted(tok, rows, kind="causal_lm_cls", **options):
    spec = task_spec({"type": kind, "text": "review : {review} label :", **options}).fit(rows)
    return spec, spec.build(tok, None)


def scored(task, rows, predictions, tmp_path: Path):
    """The task's result and the predictions CSV it writes, as dicts."""
    result = task.score(rows, predictions, eval_loss=0.0)
    evaluation = SplitEvaluation("eval", list(rows), result.metrics, result, None, 0.0)
    path = evaluation.write_predictions(tmp_path / "predictions.csv")
    with open(path, newline="", encoding="utf-8") as fh:
        return result, list(csv.DictReader(fh))


def assert_all_right(task, rows, predictions, tmp_path, labels):
    result, csv_rows = scored(task, rows, predictions, tmp_path)
    assert result.metrics["accuracy"] == 1.0
    assert result.metrics["macro_f1"] == 1.0
    assert result.metrics["invalid_rate"] == 0.0
    assert [r["correct"] for r in csv_rows] == ["true"] * len(rows)
    assert {r["reference"] for r in csv_rows} <= set(labels)  # shown without the spacing
    return result, csv_rows


def test_a_leading_space_in_the_target_is_the_templates_not_the_labels(tok, tmp_path):
    spec, task = fitted(tok, ROWS, target=" {label}")
    assert spec.labels == ("negative", "positive")
    # the model still learns the text as rendered, space included
    assert spec.label_texts == (" negative", " positive")
    (feature,) = task.encode(ROWS[:1])
    assert feature["input_ids"][-2:] == tok(" positive", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    assert_all_right(task, ROWS, [r["label"] for r in ROWS], tmp_path, spec.labels)
    base = task.baselines(ROWS, ROWS)
    assert base["majority_label"] == "positive"
    assert base["majority_accuracy"] == pytest.approx(3 / 5)


def test_a_trailing_newline_in_the_target(tok, tmp_path):
    spec, task = fitted(tok, ROWS, target="{label}\n")
    assert spec.labels == ("negative", "positive")
    assert_all_right(task, ROWS, [r["label"] for r in ROWS], tmp_path, spec.labels)
    assert task.baselines(ROWS, ROWS)["majority_label"] == "positive"


def test_case_folding_is_an_option_and_exact_stays_the_default(tok, tmp_path):
    rows = [dict(r, label=r["label"].capitalize()) if i == 0 else r for i, r in enumerate(ROWS)]
    spec, task = fitted(tok, rows, target="{label}", label_match="casefold")
    # "Positive" and "positive" are one label, shown in its most frequent spelling
    assert spec.labels == ("negative", "positive")
    shouted = [r["label"].upper() for r in rows]  # "POSITIVE" is right under casefold
    result, csv_rows = assert_all_right(task, rows, shouted, tmp_path, spec.labels)
    assert result.predictions[0] == "positive"
    # exact (the default) keeps case: the same predictions are no labels at all
    spec, task = fitted(tok, ROWS, target="{label}")
    result = task.score(ROWS, [r["label"].upper() for r in ROWS], eval_loss=0.0)
    assert result.metrics["accuracy"] == 0.0 and result.metrics["invalid_rate"] == 1.0
    with pytest.raises(ValueError, match="label_match must be one of"):
        task_spec({"type": "causal_lm_cls", "text": "{x}", "label_match": "lower"})


def test_labels_sharing_words_stay_apart(tok, tmp_path):
    rows = [
        {"review": "awful", "label": "complaint"},
        {"review": "nice", "label": "no complaint"},
        {"review": "rude", "label": "complaint"},
        {"review": "good", "label": "no"},  # a label that begins another
    ]
    spec, task = fitted(tok, rows, target=" {label}")
    assert spec.labels == ("complaint", "no", "no complaint")
    assert_all_right(task, rows, [r["label"] for r in rows], tmp_path, spec.labels)
    # each label's text never counts for a label it is part of
    wrong = ["no complaint", "complaint", "no complaint", "no complaint"]
    result, csv_rows = scored(task, rows, wrong, tmp_path)
    assert result.metrics["accuracy"] == 0.0 and result.metrics["invalid_rate"] == 0.0
    assert [r["correct"] for r in csv_rows] == ["false"] * 4


def test_labels_of_several_tokens(tok, tmp_path):
    rows = [
        {"review": "awful", "label": "very bad"},
        {"review": "nice", "label": "very good"},
        {"review": "lovely", "label": "very good"},
    ]
    spec, task = fitted(tok, rows, target=" {label}")
    assert spec.labels == ("very bad", "very good")
    # generation leaves room for the longest label as trained (+2), from the label texts
    longest = max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in spec.label_texts)
    assert task.generation_length() == longest + 2 == 4
    assert_all_right(task, rows, [r["label"] for r in rows], tmp_path, spec.labels)


def test_a_target_that_holds_the_text_ending_generation(tok, tmp_path):
    # a common recipe writes EOS into the target; generation stops at it and decoding skips it
    eos = tok.eos_token
    spec, task = fitted(tok, ROWS, target="{label}" + eos)
    result, _ = assert_all_right(task, ROWS, [r["label"] for r in ROWS], tmp_path, task.labels)
    assert task.labels == ["negative", "positive"]
    assert task.baselines(ROWS, ROWS)["majority_label"] == "positive"


def test_label_map_keys_match_the_value_and_the_spacing_is_kept(tok, tmp_path):
    rows = [{"review": "awful", "label": "0"}, {"review": "nice", "label": "1"}]
    spec, task = fitted(tok, rows, target=" {label}", label_map={"0": "negative", "1": "positive"})
    assert spec.labels == ("negative", "positive")
    assert spec.label_texts == (" negative", " positive")
    assert_all_right(task, rows, ["negative", "positive"], tmp_path, spec.labels)


def test_two_labels_that_compare_equal_are_refused_naming_both():
    from peftkit.tasks.labels import LabelSet

    with pytest.raises(
        ValueError, match=r"labels 'ham' and ' ham\\n' are the same label.*label_map"
    ):
        LabelSet(["ham", " ham\n", "spam"])
    with pytest.raises(ValueError, match=r"labels 'Spam' and 'spam' .*case folded"):
        LabelSet(["Spam", "spam"], casefold=True)
    assert LabelSet(["Spam", "spam"]).match(" spam") == "spam"  # exact keeps case apart
