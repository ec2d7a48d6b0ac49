"""Tasks: templates, encoding (which tokens are learnt), collation, generation, scoring."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from peftkit.tasks import TASK_TYPES, TASKS, EvalContext, Template, run_eval, task_kind, task_spec
from peftkit.tasks.base import IGNORE_INDEX, pad
from peftkit.tasks.causal_lm_cls import truncate_left
from peftkit.tasks.generation import generate_texts
from peftkit.tasks.scoring import majority_baseline, score
from tiny_runs import make_model, make_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only add contention
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_model("llama", tmp_path_factory.mktemp("llama"))
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(
        folder
    )


def make_task(kind: str, tokenizer, rows=None, model=None, **options):
    """The task of ``task.type: kind`` with ``options``, its labels learnt from ``rows``."""
    spec = task_spec({"type": kind, **options})
    if rows is not None:
        spec = spec.fit(rows)
    return spec.build(tokenizer, model)


def test_template_fills_columns_with_spaces_and_reports_missing_ones():
    t = Template("Tweet text : {Tweet text} Label : {{literal}}")
    assert t.fields == ["Tweet text"]
    assert t.render({"Tweet text": "hi"}) == "Tweet text : hi Label : {literal}"
    with pytest.raises(KeyError, match="needs column 'Tweet text'.*only \\['text'\\]"):
        t.render({"text": "hi"})
    assert t.missing(["text"]) == ["Tweet text"]


def test_causal_cls_learns_only_the_label_and_eos(tok):
    task = make_task("causal_lm_cls", tok, text="review : {review} label :", target="{label}")
    rows = [{"review": "the food was great", "label": "positive"}]
    (feature,) = task.encode(rows)
    prompt = tok("review : the food was great label :")["input_ids"]
    target = tok("positive", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert feature["input_ids"] == prompt + target
    assert feature["labels"] == [IGNORE_INDEX] * len(prompt) + target
    batch = task.collate(task.encode(rows + [{"review": "bad", "label": "negative"}]))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    # the short row is right-padded: pad ids, mask 0, label -100
    short = batch["attention_mask"][1]
    assert short.sum() < short.numel() and (batch["labels"][1][short == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1][short == 0] == tok.pad_token_id).all()
    # "positive"/"negative" + EOS: 2 scored tokens per row, none at position 0
    assert task.count_targets(batch) == 4
    # the causal loss predicts token t+1 from <= t: a label at position 0 is never scored
    labels = torch.tensor([[5, 6, IGNORE_INDEX], [IGNORE_INDEX, 7, 8]])
    assert task.count_targets({"labels": labels}) == 1 + 2


def test_long_prompts_lose_tokens_from_the_left_and_keep_bos():
    assert truncate_left([2, 10, 11, 12, 13], 3, bos=2) == [2, 12, 13]
    assert truncate_left([10, 11, 12, 13], 2, bos=2) == [12, 13]
    assert truncate_left([10, 11], 5, bos=2) == [10, 11]


def test_causal_cls_respects_max_length(tok):
    task = make_task("causal_lm_cls", tok, text="{review} :", target="{label}", max_length=6)
    (feature,) = task.encode(
        [{"review": "the food was great and staff very nice", "label": "positive"}]
    )
    assert len(feature["input_ids"]) == 6
    assert feature["input_ids"][-2:] == [tok.convert_tokens_to_ids("positive"), tok.eos_token_id]
    assert feature["input_ids"][-3] == tok.convert_tokens_to_ids(":")  # the cue survives


def test_plain_text_blocks_cover_the_token_stream(tok):
    task = make_task("causal_lm", tok, block_size=4)
    rows = [{"text": "the food was great"}, {"text": "staff very nice"}]
    features = task.encode(rows)
    stream = [i for f in features for i in f["input_ids"]]
    expected = (
        tok("the food was great", add_special_tokens=False)["input_ids"]
        + [tok.eos_token_id]
        + tok("staff very nice", add_special_tokens=False)["input_ids"]
        + [tok.eos_token_id]
    )
    assert len(expected) == 9
    # blocks of 4; the last, 1-token block predicts nothing (causal shift) and is dropped
    assert [len(f["input_ids"]) for f in features] == [4, 4]
    assert stream == expected[:8]
    assert all(f["labels"] == f["input_ids"] for f in features)


def test_seq2seq_targets_end_with_eos_and_pad_to_ignore(tok):
    task = make_task("seq2seq", tok, text="{mr}", target="{ref}")
    rows = [
        {"mr": "name[Alpha]", "ref": "Alpha serves thai food"},
        {"mr": "name[Fig]", "ref": "Fig"},
    ]
    batch = task.collate(task.encode(rows))
    assert batch["labels"][0].tolist()[-1] == tok.eos_token_id
    assert (
        batch["labels"][1].tolist()
        == [tok.convert_tokens_to_ids("Fig"), tok.eos_token_id] + [IGNORE_INDEX] * 3
    )
    assert task.count_targets(batch) == 5 + 2


def test_seq_cls_label_ids_follow_the_sorted_label_set(tok):
    spec = task_spec({"type": "seq_cls", "text": "{review}"})
    rows = [{"review": "great", "label": "pos"}, {"review": "bad", "label": "neg"}]
    spec = spec.fit(rows)
    assert spec.labels == ("neg", "pos") and spec.state() == {"labels": ["neg", "pos"]}
    assert spec.model_kwargs() == {
        "num_labels": 2,
        "id2label": {0: "neg", 1: "pos"},
        "label2id": {"neg": 0, "pos": 1},
    }
    task = spec.build(tok, None)
    batch = task.collate(task.encode(rows))
    assert batch["labels"].tolist() == [1, 0]
    problems = spec.check_records([{"review": "x", "label": "meh"}], "eval", need_targets=True)
    assert problems and "meh" in problems[0]
    with pytest.raises(ValueError, match="found 1 label value"):
        spec.fit(rows[:1])
    # a run folder's task_state.json gives the label set back without the data
    fresh = task_spec({"type": "seq_cls", "text": "{review}"})
    assert fresh.needs_labels and fresh.restore({"labels": ["neg", "pos"]}) == spec


def test_missing_columns_are_reported_per_split(tok):
    spec = task_spec({"type": "causal_lm_cls", "text": "{Tweet text} Label :", "target": "{Label}"})
    problems = spec.check_records([{"text": "a", "label": "b"}], "train", need_targets=True)
    assert "data.train" in problems[0] and "Tweet text" in problems[0] and "Label" in problems[0]
    # a test file without labels is fine: only the prompt's columns are needed
    assert spec.check_records([{"Tweet text": "a"}], "test", need_targets=False) == []
    assert not spec.has_targets([{"Tweet text": "a"}])


def _greedy_no_cache(model, ids: list[int], steps: int, eos: int) -> list[int]:
    """Reference decoding: full forward pass per token, no KV cache, no padding."""
    seq = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt == eos:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


def test_batched_left_padded_generation_matches_a_cache_free_greedy_reference(llama):
    model, tok = llama
    prompts = [
        "the food was great",
        "staff",
        "the food was awful and staff very rude",
        "Alpha serves",
    ]
    ids = tok(prompts)["input_ids"]
    ctx = EvalContext(model=model, device=torch.device("cpu"), batch_size=3)
    texts = generate_texts(ctx, tok, ids, max_new_tokens=6)
    for prompt_ids, text in zip(ids, texts):
        ref = _greedy_no_cache(model, prompt_ids, 6, tok.eos_token_id)
        assert text == tok.decode(ref, skip_special_tokens=True).strip()
    assert not model.training


def test_scores_match_their_definitions():
    preds = ["a", "b", "a", "x"]
    refs = ["a", "b", "b", "a"]
    out = score(["accuracy", "macro_f1"], preds, refs, labels=["a", "b"])
    assert out["accuracy"] == pytest.approx(0.5)
    # F1(a) = 2*1/(2+2) = 1/2, F1(b) = 2*1/(1+2) = 2/3; mean 7/12
    assert out["macro_f1"] == pytest.approx(7 / 12)
    assert out["invalid_rate"] == pytest.approx(0.25)  # "x" is no label
    base = majority_baseline(["a", "a", "b"], ["a", "b", "b", "b"], ["a", "b"])
    assert base["majority_label"] == "a" and base["majority_accuracy"] == pytest.approx(0.25)
    # best reference: LCS 3 of 3 predicted and 4 reference words, F = 2 * 1 * 3/4 / (1 + 3/4)
    gen = score(["rouge_l"], ["the cat sat"], [["a dog", "the cat sat down"]])
    assert gen["rouge_l"] == pytest.approx(6 / 7)


def test_grouped_references_for_generation(tok):
    task = make_task("causal_lm_gen", tok, text="{mr} :", target="{ref}", metrics=["rouge_l"])
    rows = [{"mr": "m1", "ref": "a"}, {"mr": "m2", "ref": "b"}, {"mr": "m1", "ref": "c"}]
    assert [r["mr"] for r in task.scored_rows(rows)] == ["m1", "m2"]
    # one prediction per prompt, scored against every reference of that prompt
    result = task.score(rows, ["c", "x"], eval_loss=0.0)
    assert result.references == [["a", "c"], ["b"]] and result.predictions == ["c", "x"]
    assert result.metrics["rouge_l"] == pytest.approx(0.5)  # "c" matches, "x" does not


def test_pad_left_and_right():
    assert pad([[1, 2], [3]], 0).tolist() == [[1, 2], [3, 0]]
    assert pad([[1, 2], [3]], 0, left=True).tolist() == [[1, 2], [0, 3]]


@pytest.mark.parametrize(
    ("method", "left"), [("prompt", True), ("ptuning", True), ("prefix", False), ("lora", False)]
)
def test_decoder_classifier_pads_left_only_under_embedding_prompts(tmp_path, tok, method, left):
    """A llama `score` head pools the last position when prompt/P-tuning hand it embeddings:
    left padding keeps that position real; other methods keep right padding."""
    from transformers import AutoModelForSequenceClassification

    from peftkit import (
        LoraConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        get_peft_model,
    )

    folder = make_model("llama", tmp_path / "llama")
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    config = {
        "prompt": PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
        "ptuning": PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
        "prefix": PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
        "lora": LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["q_proj"]),
    }[method]
    model = get_peft_model(base, config)
    labelled = [{"review": "x", "label": "negative"}, {"review": "y", "label": "positive"}]
    task = make_task("seq_cls", tok, rows=labelled, model=model, text="{review}")
    rows = [
        {"review": "the food was great", "label": "positive"},
        {"review": "the food was great and staff very nice", "label": "positive"},
    ]
    batch = task.collate(task.encode(rows))
    short = batch["attention_mask"][0]
    assert bool(short[0] == 0) is left and bool(short[-1] == 0) is not left
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    assert model(**inputs).logits.shape == (2, 2)
    if left:  # the same rows padded on the right are refused: the head would pool a pad
        plain = make_task("seq_cls", tok, rows=labelled, model=base, text="{review}")
        right = {k: v for k, v in plain.collate(plain.encode(rows)).items() if k != "labels"}
        with pytest.raises(ValueError, match="pad on the left"):
            model(**right)
    else:  # right padding: the short row classifies exactly as it does alone
        alone = {k: v for k, v in task.collate(task.encode(rows[:1])).items() if k != "labels"}
        torch.testing.assert_close(
            model(**inputs).logits[0], model(**alone).logits[0], rtol=1e-5, atol=1e-6
        )


def test_token_cls_labels_each_words_first_subword_only():
    """WordPiece splits 'Snapchatting' in three: only its first piece carries the tag; special
    tokens and the other pieces are ignored by the loss; truncated words are predicted O."""
    from transformers import AutoTokenizer

    from peftkit.models import tokenizer_folder

    tok = AutoTokenizer.from_pretrained(tokenizer_folder("minilm-l6"))
    rows = [
        {"tokens": ["Snapchatting", "in", "Reykjavik"], "tags": ["B-product", "O", "B-location"]},
        {"tokens": ["hi"], "tags": ["O"]},
    ]
    task = make_task("token_cls", tok, rows=rows)
    assert task.labels == ["O", "B-location", "B-product"]
    first, short = task.encode(rows)
    pieces = tok.convert_ids_to_tokens(first["input_ids"])
    assert pieces == ["[CLS]", "snap", "##cha", "##tting", "in", "reykjavik", "[SEP]"]
    assert first["labels"] == [IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX, 0, 1, IGNORE_INDEX]
    assert first["first_tokens"] == [1, 4, 5]
    batch = task.collate([first, short])
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 0] + [IGNORE_INDEX] * 5
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0]
    # decoding reads each word's first token; a word lost to truncation is predicted O
    logits = torch.full((2, 7, 3), -1.0)
    logits[0, 1, 2] = logits[0, 4, 0] = logits[0, 5, 1] = logits[1, 1, 0] = 1.0
    decoded = task.decode([first, short], batch, SimpleNamespace(logits=logits))
    assert decoded == [["B-product", "O", "B-location"], ["O"]]
    assert task.texts(rows[:1], [["B-product", "O"]]) == ["B-product O O"]
    problems = task.spec.check_records([{"tokens": ["a", "b"], "tags": ["O"]}], "eval", True)
    assert problems and "2 words but 1 tags" in problems[0]


def test_token_cls_scores_entities_like_conlleval(tok):
    task = make_task("token_cls", tok, labels=["O", "B-PER", "I-PER"], rows=[])
    rows = [{"tokens": ["Ann", "Lee", "ran"], "tags": ["B-PER", "I-PER", "O"]}] * 2
    predictions = [["B-PER", "I-PER", "O"], ["B-PER", "O", "O"]]  # one exact entity, one cut short
    result = task.score(rows, predictions, eval_loss=0.0)
    # 2 gold entities, 2 predicted, 1 right: P = R = F1 = 1/2; 5 of 6 tags right
    assert result.metrics["f1"] == pytest.approx(0.5)
    assert result.metrics["precision"] == pytest.approx(0.5)
    assert result.metrics["accuracy"] == pytest.approx(5 / 6)
    assert result.predictions == ["B-PER I-PER O", "B-PER O O"]


# extractive QA (windows, offsets, decoding, v1/v2): tests/test_qa.py


class _LengthLoss(torch.nn.Module):
    """A stand-in LM whose loss is the batch's width and whose logits favour class 1 when the
    row's first token id is odd: outputs worked out by hand below."""

    def forward(self, input_ids, attention_mask=None, labels=None, **_):
        odd = (input_ids[:, 0] % 2).float()  # (B,)
        logits = torch.stack([1 - odd, odd], dim=-1)  # (B, 2)
        return SimpleNamespace(loss=torch.tensor(float(input_ids.shape[1])), logits=logits)


def test_run_eval_weights_each_batch_by_its_targets(tok):
    """Blocks of 4 over a 6-token stream: [4 tokens] (3 predicted) and [2 tokens] (1 predicted).
    Batch losses 4 and 2 (their widths) average to (4*3 + 2*1) / 4 = 3.5, not (4 + 2) / 2."""
    task = make_task("causal_lm", tok, block_size=4)
    rows = [{"text": "the food was great staff"}]  # 5 words + EOS = 6 tokens
    features = task.encode(rows)
    assert [len(f["input_ids"]) for f in features] == [4, 2]
    ctx = EvalContext(model=_LengthLoss(), device=torch.device("cpu"), batch_size=1)
    metrics, result = run_eval(ctx, task, rows, features)
    assert metrics["eval_loss"] == pytest.approx(3.5)
    assert metrics["perplexity"] == pytest.approx(33.11545, rel=1e-6)  # e^3.5
    assert result.predictions == []


def test_run_eval_scores_the_predictions_of_its_own_batches(tok):
    """No state between calls: the same task scores two row sets in turn, each from its own pass.
    Ids: "bad"=14 and "great"=22 (even -> class 0 "neg"), "the"=45 (odd -> class 1 "pos")."""
    ids = tok.convert_tokens_to_ids(["bad", "great", "the"])
    assert ids == [14, 22, 45]
    task = make_task("seq_cls", tok, text="{review}", labels=["neg", "pos"], rows=[])
    ctx = EvalContext(model=_LengthLoss(), device=torch.device("cpu"), batch_size=2)
    first = [
        {"review": "great", "label": "neg"},
        {"review": "bad", "label": "pos"},
        {"review": "the food", "label": "pos"},
    ]
    metrics, result = run_eval(ctx, task, first, task.encode(first))
    assert result.predictions == ["neg", "neg", "pos"]
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    # batches [great, bad] (width 1, 2 rows) and [the food] (width 2, 1 row): (1*2 + 2*1) / 3
    assert metrics["eval_loss"] == pytest.approx(4 / 3)
    second = [{"review": "the", "label": "pos"}]
    metrics, result = run_eval(ctx, task, second, task.encode(second))
    assert result.predictions == ["pos"] and metrics["accuracy"] == 1.0
    assert task.predict(ctx, [{"review": "bad"}]) == ["neg"]  # rows without labels


def test_generate_inputs_are_read_by_the_task():
    """`peftkit generate` hands the task a --prompt as {"text": ...} or a file row."""
    prompted = task_spec({"type": "causal_lm_cls", "text": "review : {review} label :"})
    row = prompted.input_row({"text": "great"})
    assert row == {"review": "great"} and prompted.describe(row) == "review : great label :"
    with pytest.raises(ValueError, match="needs columns \\['a', 'b'\\].*--raw"):
        task_spec({"type": "causal_lm_cls", "text": "{a} {b}"}).input_row({"text": "x"})
    tagger = task_spec({"type": "token_cls"})
    words = tagger.input_row({"text": "Alpha serves thai food"})
    assert words == {"tokens": ["Alpha", "serves", "thai", "food"]}
    assert tagger.describe(words) == "Alpha serves thai food"
    reader = task_spec({"type": "qa"})
    assert reader.describe({"question": "who?", "context": "Ann ran"}) == "who? | Ann ran"
    with pytest.raises(ValueError, match="reads columns \\['question', 'context'\\]"):
        reader.input_row({"text": "who?"})


def test_one_table_names_task_class_adapter_type_and_auto_class():
    from peftkit import TaskType

    assert task_kind("seq_cls").auto_class == "AutoModelForSequenceClassification"
    assert task_kind(TaskType.CAUSAL_LM).name == "causal_lm"  # a bare adapter's type
    assert task_kind("SEQ_2_SEQ_LM").name == "seq2seq" and task_kind("question_ans").name == "qa"
    required = {name: {"text": "{x}"} for name in ("causal_lm_cls", "causal_lm_gen", "seq2seq")}
    assert set(TASKS) <= set(TASK_TYPES)  # every task the trainer runs has its table row
    for name, row in TASK_TYPES.items():
        if name in TASKS:
            spec = task_spec({"type": name, **required.get(name, {})})
            assert spec.kind is row and spec.task_type is row.task_type and spec.task is TASKS[name]


def test_baseline_line_says_nothing_without_scores():
    from peftkit.tasks.base import Task

    assert Task.baseline_line({}) is None
    assert Task.baseline_line({"majority_label": "x"}) is None  # no score to show
    assert Task.baseline_line({"no_answer_f1": 0.5}) == "baselines: no_answer_f1=0.5000"
    line = Task.baseline_line({"majority_accuracy": 0.8, "majority_label": "a"})
    assert line.startswith("majority-class baseline accuracy=0.8000 (always 'a')")
