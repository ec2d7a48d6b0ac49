"""Tests for peftkit.metrics: hand-worked examples, properties, and the reference libraries.

The reference libraries (scikit-learn, rouge-score, sacrebleu, seqeval) are test-only oracles;
peftkit never imports them.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from peftkit.metrics import accuracy, bleu, macro_f1, perplexity, rouge_l, seq_f1, squad_em_f1

WORDS = (
    "the a cat dog sat on mat rug it is was big small red , . ! ? 's 3.5 10-4 (x) e-mail".split()
)


def random_sentence(rng: random.Random, lo: int = 0, hi: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


# ---------------------------------------------------------------------------------------------
# accuracy / macro F1 / perplexity
# ---------------------------------------------------------------------------------------------


def test_accuracy_hand_and_tensors():
    # 3 of 4 equal.
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert accuracy(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1])) == pytest.approx(2 / 3)
    assert accuracy(["spam", "ham"], ["spam", "ham"]) == 1.0


@pytest.mark.parametrize("fn", [accuracy, macro_f1])
def test_classification_bad_input(fn):
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        fn([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="no predictions"):
        fn([], [])


def test_macro_f1_hand():
    # preds a a b b / refs a b b c
    # a: TP=1, predicted 2, gold 1 -> F1 = 2*1/(2+1) = 2/3
    # b: TP=1, predicted 2, gold 2 -> F1 = 2*1/(2+2) = 1/2
    # c: never predicted          -> F1 = 0
    preds, refs = ["a", "a", "b", "b"], ["a", "b", "b", "c"]
    assert macro_f1(preds, refs) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    # Restricting the classes to a, b averages only those two.
    assert macro_f1(preds, refs, labels=["a", "b"]) == pytest.approx((2 / 3 + 1 / 2) / 2)
    # A class that is asked for but appears nowhere contributes F1 = 0.
    assert macro_f1(preds, refs, labels=["a", "b", "z"]) == pytest.approx((2 / 3 + 1 / 2) / 3)


def test_macro_f1_constant_predictor_is_penalised():
    # Always predicting the majority class: accuracy 0.9 but macro F1 = (F1_ham + 0) / 2.
    refs = ["ham"] * 9 + ["spam"]
    preds = ["ham"] * 10
    f1_ham = 2 * 9 / (10 + 9)
    assert accuracy(preds, refs) == pytest.approx(0.9)
    assert macro_f1(preds, refs) == pytest.approx(f1_ham / 2)


def test_macro_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    rng = random.Random(0)
    for trial in range(30):
        k = rng.randint(2, 5)
        refs = [rng.randrange(k) for _ in range(rng.randint(1, 40))]
        preds = [rng.randrange(k + (trial % 2)) for _ in refs]  # sometimes an unseen class
        want = f1_score(refs, preds, average="macro", zero_division=0)
        assert macro_f1(preds, refs) == pytest.approx(want, rel=1e-12)
        labels = list(range(k))
        want = f1_score(refs, preds, labels=labels, average="macro", zero_division=0)
        assert macro_f1(preds, refs, labels=labels) == pytest.approx(want, rel=1e-12)


def test_perplexity():
    assert perplexity(math.log(10.0)) == pytest.approx(10.0)
    assert perplexity(torch.tensor(0.0)) == 1.0
    # The token-mean NLL of a uniform model over V classes is log V -> perplexity V.
    logits = torch.zeros(4, 7, 50)  # (B, T, V)
    labels = torch.randint(0, 50, (4, 7))
    nll = torch.nn.functional.cross_entropy(logits.view(-1, 50), labels.view(-1))
    assert perplexity(nll) == pytest.approx(50.0, rel=1e-5)
    assert perplexity(1e6) == math.inf
    with pytest.raises(ValueError, match="NaN"):
        perplexity(float("nan"))


# ---------------------------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------------------------


def test_rouge_l_hand():
    # pred tokens: the cat sat on the mat (6) ; ref: the cat is on the mat (6)
    # LCS = "the cat on the mat" = 5 -> P = R = 5/6 -> F = 5/6.
    assert rouge_l(["The cat sat on the mat."], ["the cat is on the mat"]) == pytest.approx(5 / 6)
    # pred "a b" vs ref "a c b d": LCS 2, P = 1, R = 1/2 -> F = 2/3.
    # Several references: the best one counts (identical ref -> 1).
    assert rouge_l(["a b"], [["a c b d", "A-B"]]) == pytest.approx(1.0)
    # Mean over sentences: (2/3 + 0) / 2.
    assert rouge_l(["a b", "x"], ["a c b d", "y"]) == pytest.approx(1 / 3)
    # Punctuation-only or empty predictions have no tokens -> 0.
    assert rouge_l(["", "!!"], ["a", "a"]) == 0.0


def test_rouge_l_matches_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rng = random.Random(1)
    preds, refs, want = [], [], []
    for _ in range(60):
        pred = random_sentence(rng)
        ref = [random_sentence(rng, 1) for _ in range(rng.randint(1, 3))]
        preds.append(pred)
        refs.append(ref)
        want.append(scorer.score_multi(ref, pred)["rougeL"].fmeasure)
    assert rouge_l(preds, refs) == pytest.approx(sum(want) / len(want), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------------


def test_bleu_hand():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # All n-gram precisions are 1 (5/5, 4/4, 3/3, 2/2); c = 5, r = 10 -> BP = exp(1 - 10/5).
    assert bleu(["a b c d e"], ["a b c d e f g h i j"]) == pytest.approx(100 * math.exp(-1))
    # Closest reference length is used: the 5-token reference -> BP = 1.
    assert bleu(["a b c d e"], [["a b c d e f g h i j", "a b c d e"]]) == pytest.approx(100.0)
    # p1 = 4/5, p2 = 2/4 (ab, bc), p3 = 1/3 (abc), p4 = 0/2 -> "exp" smoothing: 1/(2*2).
    # BLEU = 100 * (4/5 * 1/2 * 1/3 * 1/4) ** (1/4)
    assert bleu(["a b c x d"], ["a b c y d"]) == pytest.approx(100 * (1 / 30) ** 0.25)
    # 13a tokenisation splits punctuation off words, so these agree exactly.
    assert bleu(["Hello, world! (ok)"], ["Hello , world ! ( ok )"]) == pytest.approx(100.0)
    # Case matters (sacrebleu default).
    assert bleu(["The cat sat on the mat"], ["the cat sat on the mat"]) < 100.0
    # No 4-grams anywhere -> 0 (BLEU-4 is undefined, reported as 0).
    assert bleu(["a b c"], ["a b c"]) == 0.0
    with pytest.raises(ValueError, match="empty references"):
        bleu(["a"], [[""]])


def test_bleu_matches_sacrebleu():
    import sacrebleu

    rng = random.Random(2)
    for trial in range(12):
        n = rng.randint(1, 25)
        n_refs = rng.randint(1, 3)
        streams = [[random_sentence(rng, 1, 14) for _ in range(n)] for _ in range(n_refs)]
        if trial % 2:  # unrelated predictions: low scores, smoothing and brevity penalty
            preds = [random_sentence(rng) for _ in range(n)]
        else:  # near copies of the first reference: high scores, clipping matters
            preds = [" ".join(w for w in r.split() if rng.random() > 0.15) for r in streams[0]]
        ours = bleu(preds, [list(r) for r in zip(*streams)])
        want = sacrebleu.corpus_bleu(preds, streams).score
        assert ours == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_bleu_tokenizer_matches_sacrebleu_13a():
    import sacrebleu

    texts = [
        "It's 3.5-4 e-mails, (maybe) 10,000 &amp; more... $5/hr #tag @user {x} [y] a:b;c",
        'Quotes "here" &quot;there&quot; <tags> &lt;b&gt; 1.5. Done,right',
    ]
    for t in texts:
        # Reversing sacrebleu's 13a tokens keeps the unigrams and breaks every longer n-gram:
        # the scores agree only if both sides cut the text into the same tokens.
        tokens = sacrebleu.BLEU().tokenizer(t).split()
        for pred in (" ".join(reversed(tokens)), " ".join(tokens[:-3])):
            want = sacrebleu.corpus_bleu([pred], [[t]]).score
            assert want > 0
            assert bleu([pred], [t]) == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# SQuAD v2
# ---------------------------------------------------------------------------------------------


def test_squad_hand():
    # 1) "The Normans" vs "Normans": normalisation drops "the" -> EM 1, F1 1.
    # 2) "Norman people in France" vs "the Norman people": tokens [norman people in france] vs
    #    [norman people]; 2 shared -> P = 2/4, R = 2/2 -> F1 = 2/3; EM 0.
    # 3) unanswerable, predicted "" -> EM 1, F1 1.
    # 4) unanswerable, predicted "Paris" -> 0, 0.
    preds = ["The Normans", "Norman people in France", "", "Paris"]
    refs = [
        ["Normans", "the norman people"],
        "the Norman people",
        [],
        {"text": [], "answer_start": []},
    ]
    out = squad_em_f1(preds, refs)
    assert out["exact"] == pytest.approx(100 * (1 + 0 + 1 + 0) / 4)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0) / 4)
    assert out["total"] == 4
    assert out["HasAns_exact"] == pytest.approx(50.0)
    assert out["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert out["NoAns_exact"] == pytest.approx(50.0) and out["NoAns_total"] == 2


def test_squad_normalisation_and_max_over_golds():
    # Punctuation, case, articles and extra spaces are ignored.
    assert squad_em_f1(["  An  apple, (RED)! "], [["a red apple", "apple red"]])["exact"] == 100.0
    # A gold answer that normalises to "" (only an article) is dropped -> question is NoAns.
    out = squad_em_f1([""], [["the"]])
    assert out["exact"] == 100.0 and "NoAns_total" in out and "HasAns_total" not in out
    # Only answered question: predicting "" scores 0.
    assert squad_em_f1([""], [["Paris"]])["f1"] == 0.0


# ---------------------------------------------------------------------------------------------
# Entity-level F1
# ---------------------------------------------------------------------------------------------


def test_seq_f1_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG"]]
    # gold entities: PER(0,1), LOC(3,3), ORG(0,0)       -> 3
    # pred entities: PER(0,1), ORG(3,3), ORG(0,1)       -> 3
    # correct: PER(0,1) only (ORG(0,1) has the wrong end) -> P = R = F1 = 1/3
    out = seq_f1(pred, gold)
    assert out["precision"] == pytest.approx(1 / 3)
    assert out["recall"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx(1 / 3)
    assert out["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert out["per_type"]["LOC"]["f1"] == 0.0 and out["per_type"]["LOC"]["support"] == 1
    assert out["per_type"]["ORG"]["precision"] == 0.0


def test_seq_f1_lenient_chunks():
    # conlleval rules: an I- tag after O opens an entity; a type change splits a chunk;
    # types may contain dashes (WNUT's "creative-work").
    gold = [["I-PER", "I-PER", "I-LOC", "O", "B-creative-work", "I-creative-work"]]
    assert seq_f1(gold, gold)["f1"] == 1.0
    pred = [["B-PER", "I-PER", "B-LOC", "O", "B-creative-work", "I-creative-work"]]
    assert seq_f1(pred, gold)["f1"] == 1.0  # same spans as the lenient reading of gold
    # No entities predicted at all -> P = R = F1 = 0.
    assert seq_f1([["O"] * 6], gold)["f1"] == 0.0


def test_seq_f1_errors():
    with pytest.raises(ValueError, match="sentence 0 has 1 predicted tags but 2 gold"):
        seq_f1([["O"]], [["O", "O"]])
    with pytest.raises(ValueError, match="not BIO"):
        seq_f1([["PER"]], [["O"]])


def test_seq_f1_matches_seqeval():
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    rng = random.Random(3)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "E-LOC", "S-ORG", "I-ORG"]
    for _ in range(30):
        gold = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(8)]
        pred = [[rng.choice(tags) for _ in g] for g in gold]
        out = seq_f1(pred, gold)
        assert out["precision"] == pytest.approx(precision_score(gold, pred, zero_division=0))
        assert out["recall"] == pytest.approx(recall_score(gold, pred, zero_division=0))
        assert out["f1"] == pytest.approx(f1_score(gold, pred, zero_division=0))
        report = classification_report(gold, pred, output_dict=True, zero_division=0)
        for etype, scores in out["per_type"].items():
            assert scores["f1"] == pytest.approx(report[etype]["f1-score"])
            assert scores["support"] == report[etype]["support"]
