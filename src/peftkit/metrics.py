"""Evaluation metrics for the peftkit tasks, in plain Python (no heavy dependencies).

Each metric follows the convention of the reference implementation people report numbers
with, so a peftkit score can be put next to a published one:

==============  =====================================  ======================  =========
function        matches                                 tokenisation            scale
==============  =====================================  ======================  =========
accuracy        --                                      --                      0..1
macro_f1        sklearn ``f1_score(average="macro")``   --                      0..1
per_class_acc.  sklearn ``recall_score(average=None)``  --                      0..1
confusion_mat.  sklearn ``confusion_matrix``            --                      counts
perplexity      ``exp(mean NLL)``                       --                      >= 1
rouge_l         rouge-score ``rougeL`` F-measure        lowercase, [a-z0-9]+    0..1
bleu            sacrebleu ``corpus_bleu`` defaults      mteval-v13a             0..100
squad_em_f1     official SQuAD v2.0 evaluation script   SQuAD normalisation     0..100
seq_f1          seqeval default (conlleval chunks)      --                      0..1
==============  =====================================  ======================  =========

``squad_best_threshold`` is that script's ``find_best_thresh`` (the no-answer threshold that
scores best). Those libraries are test-time oracles only; nothing here imports them.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Hashable, Sequence

import torch

__all__ = [
    "accuracy",
    "macro_f1",
    "per_class_accuracy",
    "confusion_matrix",
    "perplexity",
    "rouge_l",
    "bleu",
    "squad_em_f1",
    "squad_question_scores",
    "squad_best_threshold",
    "seq_f1",
]


def _check_pair(preds: Sequence, refs: Sequence, what: str) -> None:
    """Fail early and clearly on the two usual misuse cases: length mismatch, empty input."""
    if len(preds) != len(refs):
        raise ValueError(
            f"{what}: got {len(preds)} predictions but {len(refs)} references; "
            "pass one reference (or one list of references) per prediction."
        )
    if len(preds) == 0:
        raise ValueError(f"{what}: got no predictions; pass at least one example.")


def _as_list(x: Sequence | torch.Tensor) -> list:
    """Tensors and numpy arrays become plain Python lists so labels compare by value."""
    if hasattr(x, "tolist"):
        return x.tolist()
    return list(x)


def _ref_list(ref: str | Sequence[str], what: str) -> list[str]:
    """A reference may be one string or several alternative strings."""
    refs = [ref] if isinstance(ref, str) else list(ref)
    if not refs:
        raise ValueError(f"{what}: a prediction has an empty list of references.")
    return refs


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


def accuracy(preds: Sequence[Hashable], refs: Sequence[Hashable]) -> float:
    """Fraction of predictions equal to their reference: ``mean(pred_i == ref_i)``.

    Labels may be strings or ints (or 1-D tensors of them).
    """
    preds, refs = _as_list(preds), _as_list(refs)
    _check_pair(preds, refs, "accuracy")
    return sum(p == r for p, r in zip(preds, refs)) / len(refs)


def macro_f1(
    preds: Sequence[Hashable],
    refs: Sequence[Hashable],
    labels: Sequence[Hashable] | None = None,
) -> float:
    """Unweighted mean over classes of the per-class F1 score.

    For class ``c``: ``P_c = TP_c / (TP_c + FP_c)``, ``R_c = TP_c / (TP_c + FN_c)``,
    ``F1_c = 2 P_c R_c / (P_c + R_c)``; an undefined ratio counts as 0, so a class the
    model never predicts scores ``F1_c = 0`` (as sklearn does with ``zero_division=0``).
    Macro averaging weighs rare classes like frequent ones, which is why it is the headline
    number for unbalanced sets such as SMS spam or Twitter complaints.

    Args:
        preds: predicted labels (strings or ints).
        refs: gold labels, same length.
        labels: the classes to average over; default: every label seen in ``preds`` or
            ``refs`` (sklearn's default).
    """
    preds, refs = _as_list(preds), _as_list(refs)
    _check_pair(preds, refs, "macro_f1")
    classes = list(dict.fromkeys(refs + preds)) if labels is None else list(labels)
    if not classes:
        raise ValueError("macro_f1: `labels` is empty; pass at least one class.")
    scores = []
    for c in classes:
        tp = sum(p == c and r == c for p, r in zip(preds, refs))
        n_pred = sum(p == c for p in preds)
        n_gold = sum(r == c for r in refs)
        # F1 = 2TP / (2TP + FP + FN) = 2TP / (n_pred + n_gold); 0 when the class is absent.
        scores.append(2 * tp / (n_pred + n_gold) if n_pred + n_gold else 0.0)
    return sum(scores) / len(scores)


def per_class_accuracy(
    preds: Sequence[Hashable], refs: Sequence[Hashable], labels: Sequence[Hashable]
) -> dict[Hashable, float | None]:
    """For each class ``c``: the fraction of rows whose reference is ``c`` predicted ``c``
    (its recall, ``TP_c / (TP_c + FN_c)``); None for a class with no rows."""
    preds, refs = _as_list(preds), _as_list(refs)
    _check_pair(preds, refs, "per_class_accuracy")
    out: dict[Hashable, float | None] = {}
    for c in labels:
        rows = [p for p, r in zip(preds, refs) if r == c]
        out[c] = sum(p == c for p in rows) / len(rows) if rows else None
    return out


def confusion_matrix(
    preds: Sequence[Hashable], refs: Sequence[Hashable], labels: Sequence[Hashable]
) -> list[list[int]]:
    """Counts ``M[i][j]`` of rows with reference ``labels[i]`` predicted ``labels[j]`` (rows:
    truth, columns: prediction, as sklearn); predictions outside ``labels`` are not counted."""
    preds, refs = _as_list(preds), _as_list(refs)
    _check_pair(preds, refs, "confusion_matrix")
    index = {c: i for i, c in enumerate(labels)}
    matrix = [[0] * len(index) for _ in index]
    for p, r in zip(preds, refs):
        if p in index and r in index:
            matrix[index[r]][index[p]] += 1
    return matrix


def perplexity(mean_nll: float | torch.Tensor) -> float:
    """Perplexity from the mean per-token negative log-likelihood (natural log): ``exp(NLL)``.

    This is what a causal-LM loss (token-averaged cross-entropy) turns into; returns ``inf``
    rather than overflowing for a very large loss.
    """
    value = (
        float(mean_nll.detach().float().mean()) if torch.is_tensor(mean_nll) else float(mean_nll)
    )
    if math.isnan(value):
        raise ValueError("perplexity: the mean NLL is NaN (did the loss diverge?).")
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


# ---------------------------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------------------------


def _rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokeniser: lowercase, every run of non-[a-z0-9] is a space."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) dynamic programme."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _rouge_l_f(pred: list[str], ref: list[str]) -> float:
    """Sentence ROUGE-L: ``P = LCS/|pred|``, ``R = LCS/|ref|``, ``F = 2PR/(P+R)``."""
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


def rouge_l(preds: Sequence[str], refs: Sequence[str | Sequence[str]]) -> float:
    """Mean sentence-level ROUGE-L F-measure (rouge-score's ``rougeL``, no stemming).

    With several references for one prediction, the best-scoring reference counts (as
    rouge-score's ``score_multi``). Returns a value in 0..1.

    Args:
        preds: generated texts.
        refs: per prediction, one reference string or a list of alternative references.
    """
    _check_pair(preds, refs, "rouge_l")
    total = 0.0
    for pred, ref in zip(preds, refs):
        p_tok = _rouge_tokens(pred)
        total += max(_rouge_l_f(p_tok, _rouge_tokens(r)) for r in _ref_list(ref, "rouge_l"))
    return total / len(preds)


# ---------------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------------

# mteval-v13a: ASCII punctuation other than  ' - . ,  always becomes its own token.
_V13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period/comma not after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period/comma not before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
]


def _tokenize_13a(text: str) -> list[str]:
    """The WMT ``mteval-v13a`` tokenisation (sacrebleu's default, case kept)."""
    text = text.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in text:
        for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
            text = text.replace(entity, char)
    text = f" {text} "
    for pattern, repl in _V13A_RULES:
        text = pattern.sub(repl, text)
    return text.split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(preds: Sequence[str], refs: Sequence[str | Sequence[str]], max_order: int = 4) -> float:
    """Corpus BLEU-4 with brevity penalty, as sacrebleu's ``corpus_bleu`` with its defaults.

    Over the whole corpus, with modified (clipped) n-gram precisions
    ``p_n = sum_i sum_g min(c_i(g), max_ref c_ref(g)) / sum_i #ngrams_n(pred_i)``::

        BLEU = 100 * BP * exp(mean_{n=1..4} log p_n),   BP = min(1, exp(1 - r / c))

    where ``c`` is the total prediction length and ``r`` sums, per sentence, the reference
    length closest to the prediction's (the shorter one on ties). Tokens come from the
    mteval-v13a tokeniser; case matters. A ``p_n`` with no match is smoothed the "exp" way
    (the k-th such order gets ``1 / (2^k * total_n)``); an order with no n-grams at all
    (every prediction shorter than n) makes the score 0. Empty references are ignored.

    Args:
        preds: generated texts.
        refs: per prediction, one reference string or a list of alternative references.
        max_order: the largest n-gram order (4 for BLEU-4).

    Returns:
        BLEU on the 0..100 scale sacrebleu reports.
    """
    _check_pair(preds, refs, "bleu")
    matches = [0] * max_order
    totals = [0] * max_order
    pred_len = ref_len = 0
    for i, (pred, ref) in enumerate(zip(preds, refs)):
        ref_toks = [_tokenize_13a(r) for r in _ref_list(ref, "bleu") if r]
        if not ref_toks:
            raise ValueError(f"bleu: prediction {i} has only empty references.")
        p_toks = _tokenize_13a(pred)
        pred_len += len(p_toks)
        # Closest reference length; on a tie the shorter reference.
        ref_len += min((abs(len(r) - len(p_toks)), len(r)) for r in ref_toks)[1]
        for n in range(1, max_order + 1):
            p_counts = _ngrams(p_toks, n)
            max_ref = Counter()
            for r in ref_toks:
                max_ref |= _ngrams(r, n)  # element-wise max over references
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in p_counts.items())
            totals[n - 1] += max(len(p_toks) - n + 1, 0)
    if pred_len == 0 or not any(matches):
        return 0.0
    log_p = 0.0
    smooth = 1.0
    for n in range(max_order):
        if totals[n] == 0:
            return 0.0
        if matches[n] == 0:
            smooth *= 2.0
            log_p += math.log(1.0 / (smooth * totals[n]))
        else:
            log_p += math.log(matches[n] / totals[n])
    bp = 1.0 if pred_len >= ref_len else math.exp(1.0 - ref_len / pred_len)
    return 100.0 * bp * math.exp(log_p / max_order)


# ---------------------------------------------------------------------------------------------
# SQuAD v2
# ---------------------------------------------------------------------------------------------

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def _squad_normalize(text: str) -> str:
    """Official SQuAD normalisation: lowercase, drop punctuation, drop a/an/the, squash spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _squad_f1(gold: str, pred: str) -> float:
    """Token-overlap F1 of normalised answers; two empty answers agree (no-answer case)."""
    g, p = _squad_normalize(gold).split(), _squad_normalize(pred).split()
    if not g or not p:
        return float(g == p)
    same = sum((Counter(g) & Counter(p)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def _squad_golds(ref: str | Sequence[str] | dict) -> list[str]:
    """Gold answers of one question; ``[""]`` when it has none (unanswerable in SQuAD v2)."""
    if isinstance(ref, dict):  # the `answers` field of read_squad records
        ref = ref["text"]
    texts = [ref] if isinstance(ref, str) else list(ref)
    golds = [t for t in texts if _squad_normalize(t)]
    return golds or [""]


def squad_question_scores(
    preds: Sequence[str], refs: Sequence[str | Sequence[str] | dict]
) -> list[tuple[float, float]]:
    """Per question, ``(exact match, F1)`` in 0..1 as the official SQuAD v2.0 script scores it:
    the max over gold answers; an unanswerable question's only gold answer is ``""``."""
    _check_pair(preds, refs, "squad_question_scores")
    out = []
    for pred, ref in zip(preds, refs):
        golds = _squad_golds(ref)
        em = max(float(_squad_normalize(g) == _squad_normalize(pred)) for g in golds)
        out.append((em, max(_squad_f1(g, pred) for g in golds)))
    return out


def squad_em_f1(
    preds: Sequence[str], refs: Sequence[str | Sequence[str] | dict]
) -> dict[str, float]:
    """Exact match and F1 as the official SQuAD v2.0 script computes them.

    Per question, the score is the max over gold answers; an unanswerable question's only
    gold answer is ``""``, so predicting ``""`` there scores 1 and anything else 0.

    Args:
        preds: predicted answer texts; ``""`` means "no answer".
        refs: per question, the gold answer texts (a list, possibly empty), one string, or a
            ``{"text": [...], "answer_start": [...]}`` dict as ``read_squad`` returns.

    Returns:
        ``{"exact", "f1", "total"}`` on the 0..100 scale, plus ``HasAns_exact``/``HasAns_f1``/
        ``HasAns_total`` and ``NoAns_*`` for the subsets that occur.
    """
    groups: dict[str, list[tuple[float, float]]] = {"HasAns": [], "NoAns": []}
    for ref, scores in zip(refs, squad_question_scores(preds, refs)):
        groups["HasAns" if _squad_golds(ref) != [""] else "NoAns"].append(scores)
    every = groups["HasAns"] + groups["NoAns"]
    out = {
        "exact": 100.0 * sum(e for e, _ in every) / len(every),
        "f1": 100.0 * sum(f for _, f in every) / len(every),
        "total": len(every),
    }
    for name, scores in groups.items():
        if scores:
            out[f"{name}_exact"] = 100.0 * sum(e for e, _ in scores) / len(scores)
            out[f"{name}_f1"] = 100.0 * sum(f for _, f in scores) / len(scores)
            out[f"{name}_total"] = len(scores)
    return out


def squad_best_threshold(
    na_scores: Sequence[float], answered: Sequence[float], abstained: Sequence[float]
) -> tuple[float, float]:
    """The no-answer threshold that scores best, as the SQuAD v2 script's ``find_best_thresh``.

    A question is answered when its no-answer score is ``<= threshold`` and abstains otherwise.
    Walking the questions by rising no-answer score (equal scores together: one threshold
    decides them all), the total moves from "abstain everywhere" by ``answered - abstained``.

    Args:
        na_scores: per question, how strongly it says "no answer" (the script's na_prob; here
            ``null score - best span score``).
        answered: per question, its score (exact or F1, 0..1) when it answers.
        abstained: per question, its score when it abstains (1 if unanswerable, else 0).

    Returns:
        ``(best mean score on the 0..100 scale, threshold)``; the threshold is ``-inf`` when
        abstaining everywhere is best.
    """
    n = len(na_scores)
    if not n or len(answered) != n or len(abstained) != n:
        raise ValueError(f"squad_best_threshold: {n} scores, {len(answered)}, {len(abstained)}")
    total = best = sum(abstained)
    threshold = -math.inf
    order = sorted(range(n), key=lambda i: na_scores[i])
    k = 0
    while k < n:
        value = na_scores[order[k]]
        while k < n and na_scores[order[k]] == value:
            total += answered[order[k]] - abstained[order[k]]
            k += 1
        if total > best:
            best, threshold = total, value
    return 100.0 * best / n, threshold


# ---------------------------------------------------------------------------------------------
# Entity-level F1 over BIO tags
# ---------------------------------------------------------------------------------------------


def _split_tag(tag: str) -> tuple[str, str]:
    """``"B-PER" -> ("B", "PER")``; ``"O" -> ("O", "")``; a bare ``"B"`` has type ``"_"``."""
    if tag == "O":
        return "O", ""
    prefix, _, etype = tag.partition("-")
    if prefix not in ("B", "I", "E", "S"):
        raise ValueError(
            f"seq_f1: tag {tag!r} is not BIO(ES); write tags as 'O' or 'B-TYPE', 'I-TYPE' "
            "(also 'E-TYPE', 'S-TYPE')."
        )
    return prefix, etype or "_"


def _chunk_ends(prev: str, prev_type: str, cur: str, cur_type: str) -> bool:
    """conlleval: does the chunk that ``prev`` belongs to end before ``cur``?"""
    if prev in ("E", "S"):
        return True
    if prev in ("B", "I") and cur in ("B", "S", "O"):
        return True
    return prev != "O" and prev_type != cur_type


def _chunk_starts(prev: str, prev_type: str, cur: str, cur_type: str) -> bool:
    """conlleval: does a new chunk begin at ``cur``? (An ``I`` after ``O`` starts one.)"""
    if cur in ("B", "S"):
        return True
    if cur in ("I", "E") and prev in ("E", "S", "O"):
        return True
    return cur != "O" and prev_type != cur_type


def _entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Spans ``(type, first, last)`` in one tag sequence, with conlleval's lenient rules."""
    spans = set()
    prev, prev_type, start = "O", "", 0
    for i, tag in enumerate([*tags, "O"]):  # a trailing O closes the last chunk
        cur, cur_type = _split_tag(tag)
        if _chunk_ends(prev, prev_type, cur, cur_type) and prev != "O":
            spans.add((prev_type, start, i - 1))
        if _chunk_starts(prev, prev_type, cur, cur_type):
            start = i
        prev, prev_type = cur, cur_type
    return spans


def _prf(n_correct: int, n_pred: int, n_gold: int) -> dict[str, float]:
    p = n_correct / n_pred if n_pred else 0.0
    r = n_correct / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f}


def seq_f1(
    pred_tags: Sequence[Sequence[str]], gold_tags: Sequence[Sequence[str]]
) -> dict[str, object]:
    """Entity-level micro precision / recall / F1 over BIO(ES) tag sequences.

    An entity is a ``(type, start, end)`` span; a predicted one counts only if the gold
    sequence has the same span with the same type. Chunks are read with conlleval's rules
    (seqeval's default mode), so ``I-X`` after ``O`` or after ``B-Y`` still opens an entity::

        P = |pred & gold| / |pred|,  R = |pred & gold| / |gold|,  F1 = 2PR / (P + R)

    Args:
        pred_tags: one tag list per sentence, e.g. ``[["B-PER", "I-PER", "O"], ...]``.
        gold_tags: gold tag lists, same shapes.

    Returns:
        ``{"precision", "recall", "f1", "per_type": {type: {precision, recall, f1, support}}}``
        on the 0..1 scale.
    """
    _check_pair(pred_tags, gold_tags, "seq_f1")
    pred_ents: set[tuple[int, str, int, int]] = set()
    gold_ents: set[tuple[int, str, int, int]] = set()
    for s, (p, g) in enumerate(zip(pred_tags, gold_tags)):
        if len(p) != len(g):
            raise ValueError(
                f"seq_f1: sentence {s} has {len(p)} predicted tags but {len(g)} gold tags; "
                "predict one tag per gold token."
            )
        pred_ents |= {(s, *e) for e in _entities(p)}
        gold_ents |= {(s, *e) for e in _entities(g)}
    correct = pred_ents & gold_ents
    per_type = {}
    for etype in sorted({e[1] for e in pred_ents | gold_ents}):

        def count(ents: set, t: str = etype) -> int:
            return sum(e[1] == t for e in ents)

        per_type[etype] = {
            **_prf(count(correct), count(pred_ents), count(gold_ents)),
            "support": count(gold_ents),
        }
    return {**_prf(len(correct), len(pred_ents), len(gold_ents)), "per_type": per_type}
