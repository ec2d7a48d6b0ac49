"""Tasks: templates, encoding (which tokens are learnt), collation, generation, scoring."""

from __future__ import annotations

import pytest
import torch

from peftkit.tasks import TASKS, EvalContext, Template
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


def make_task(kind: str, tokenizer, **options):
    cls = TASKS[kind]
    task = cls(cls.Options(**options))
    task.bind(tokenizer)
    return task


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
    # the causal loss predicts token t+1 from <= t; the count of scored tokens excludes position 0
    assert task.count_targets(batch) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


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
    task = make_task("seq_cls", tok, text="{review}")
    rows = [{"review": "great", "label": "pos"}, {"review": "bad", "label": "neg"}]
    task.fit(rows)
    assert task.labels == ["neg", "pos"]
    assert task.model_kwargs() == {"num_labels": 2}
    batch = task.collate(task.encode(rows))
    assert batch["labels"].tolist() == [1, 0]
    problems = task.check_records([{"review": "x", "label": "meh"}], "eval", need_targets=True)
    assert problems and "meh" in problems[0]


def test_missing_columns_are_reported_per_split(tok):
    task = make_task("causal_lm_cls", tok, text="{Tweet text} Label :", target="{Label}")
    problems = task.check_records([{"text": "a", "label": "b"}], "train", need_targets=True)
    assert "data.train" in problems[0] and "Tweet text" in problems[0] and "Label" in problems[0]
    # a test file without labels is fine: only the prompt's columns are needed
    assert task.check_records([{"Tweet text": "a"}], "test", need_targets=False) == []
    assert not task.has_targets([{"Tweet text": "a"}])


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
    # F1(a) = 2*1/(2+2) = 0.5, F1(b) = 2*1/(1+2) = 2/3
    assert out["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert out["invalid_rate"] == pytest.approx(0.25)
    base = majority_baseline(["a", "a", "b"], ["a", "b", "b", "b"], ["a", "b"])
    assert base["majority_label"] == "a" and base["majority_accuracy"] == pytest.approx(0.25)
    gen = score(["rouge_l"], ["the cat sat"], [["a dog", "the cat sat down"]])
    assert gen["rouge_l"] == pytest.approx(2 * 1 * 0.75 / 1.75)


def test_grouped_references_for_generation(tok):
    task = make_task("causal_lm_gen", tok, text="{mr} :", target="{ref}")
    rows = [{"mr": "m1", "ref": "a"}, {"mr": "m2", "ref": "b"}, {"mr": "m1", "ref": "c"}]
    grouped, refs = task._grouped(rows)
    assert [r["mr"] for r in grouped] == ["m1", "m2"] and refs == [["a", "c"], ["b"]]


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
    task = make_task("seq_cls", tok, text="{review}")
    task.fit([{"review": "x", "label": "negative"}, {"review": "y", "label": "positive"}])
    task.configure_model(base)
    task.use_model(model)
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
        task.pad_left = False
        right = {k: v for k, v in task.collate(task.encode(rows)).items() if k != "labels"}
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
    task = make_task("token_cls", tok)
    rows = [
        {"tokens": ["Snapchatting", "in", "Reykjavik"], "tags": ["B-product", "O", "B-location"]},
        {"tokens": ["hi"], "tags": ["O"]},
    ]
    task.fit(rows)
    assert task.labels == ["O", "B-location", "B-product"]
    first, short = task.encode(rows)
    pieces = tok.convert_ids_to_tokens(first["input_ids"])
    assert pieces == ["[CLS]", "snap", "##cha", "##tting", "in", "reykjavik", "[SEP]"]
    assert first["labels"] == [IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX, 0, 1, IGNORE_INDEX]
    assert first["first_tokens"] == [1, 4, 5]
    batch = task.collate([first, short])
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 0] + [IGNORE_INDEX] * 5
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert task._tags([2, 0], 3) == ["B-product", "O", "O"]  # a word lost to truncation -> O
    problems = task.check_records([{"tokens": ["a", "b"], "tags": ["O"]}], "eval", True)
    assert problems and "2 words but 1 tags" in problems[0]


def test_token_cls_scores_entities_like_conlleval(tok):
    task = make_task("token_cls", tok)
    task.labels = ["O", "B-PER", "I-PER"]
    rows = [{"tokens": ["Ann", "Lee", "ran"], "tags": ["B-PER", "I-PER", "O"]}] * 2
    task._eval_preds = [[1, 2, 0], [1, 0, 0]]  # one exact entity, one cut short
    result = task.evaluate(None, rows, eval_loss=0.0)
    assert result.metrics["f1"] == pytest.approx(0.5)
    assert result.metrics["accuracy"] == pytest.approx(5 / 6)
    assert result.predictions == ["B-PER I-PER O", "B-PER O O"]


def test_qa_targets_map_answer_characters_to_tokens_and_back():
    """The gold span's tokens decode back to the exact answer text; an answer cut off by
    max_length (and an unanswerable question) point at [CLS]; decoding abstains when the [CLS]
    pair outscores every span."""
    from transformers import AutoTokenizer

    from peftkit.models import tokenizer_folder

    tok = AutoTokenizer.from_pretrained(tokenizer_folder("minilm-l6"))
    context = "The Normans gave their name to Normandy, a region in France."
    answer = "Normandy"
    rows = [
        {"question": "Which region?", "context": context,
         "answers": {"text": [answer], "answer_start": [context.index(answer)]}},
        {"question": "Who?", "context": context, "answers": {"text": [], "answer_start": []}},
    ]  # fmt: skip
    task = make_task("qa", tok, max_length=64)
    first, second = task.encode(rows)
    s, e = first["start_positions"], first["end_positions"]
    assert 0 < s <= e
    assert context[first["spans"][s][0] : first["spans"][e][1]] == answer
    assert (second["start_positions"], second["end_positions"]) == (0, 0)
    # decoding: the gold span's logits win, unless "no answer" scores higher
    n = len(first["input_ids"])
    start, end = [0.0] * n, [0.0] * n
    start[s], end[e] = 5.0, 5.0
    assert task._decode(start, end, first, context) == answer
    start[0], end[0] = 6.0, 6.0
    assert task._decode(start, end, first, context) == ""
    # a context cut before the answer: nothing to point at but [CLS]
    short = make_task("qa", tok, max_length=10)
    (cut,) = short.encode(rows[:1])
    assert (cut["start_positions"], cut["end_positions"]) == (0, 0)
    assert task.check_records([{"question": "q", "context": "c", "answers": "x"}], "eval", True)
