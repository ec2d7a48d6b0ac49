"""Rank classification (``task.decode: rank``) against a plain, unbatched reference.

The reference scores each (row, label) pair with its own full forward of prompt + label tokens
+ EOS (no padding, no cache, no batching) and takes the argmax. The batched path runs prompts
once (left-padded, cached) and the labels as continuations, rows of different lengths in one
batch; it must give the same scores (sum and mean) and the same labels, for LoRA and every
prompt method, on tiny models of architectures that take positions three ways (Llama: rotary
from position_ids; GPT-2: learnt absolute positions; Bloom: ALiBi from the mask, no
position_ids), and on encoder-decoders (T5, BART).
"""

from __future__ import annotations

import pytest
import torch

from peftkit import (
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from peftkit.tasks import EvalContext, task_spec
from peftkit.tasks.base import input_positions
from tiny_models import tiny_model
from tiny_runs import make_tokenizer, vocab_size

# labels of 1-3 words; "very" begins "very good" (without EOS in the score, "very" would
# always win a sum); one word of the vocabulary each, so tokens are words
LABELS = ["good", "very good", "very", "awful and rude"]
ROWS = [
    {"review": "the food was great and staff very nice", "label": "very good"},
    {"review": "awful", "label": "awful and rude"},
    {"review": "staff very rude", "label": "awful and rude"},
    {"review": "the food was good", "label": "good"},
    {"review": "nice", "label": "very"},
    {"review": "the staff was lovely and the food very good", "label": "very good"},
    {"review": "poor", "label": "good"},
]
SPECIAL = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def adapter_config(method: str, arch: str, task_type: str):
    if method == "lora":  # B random too, so the adapter changes every score
        return LoraConfig(
            task_type=task_type,
            r=4,
            lora_alpha=8,
            target_modules=LORA_TARGETS[arch],
            fan_in_fan_out=arch == "gpt2",  # GPT-2's Conv1D stores weights as (in, out)
            init_lora_weights=False,
        )
    if method == "prompt_tuning":
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=3)
    if method == "p_tuning":
        return PromptEncoderConfig(
            task_type=task_type, num_virtual_tokens=3, encoder_hidden_size=16
        )
    if method == "prefix_tuning":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=3)
    raise ValueError(method)


def adapted(arch: str, method: str, task_type: str = "CAUSAL_LM"):
    extra = {"decoder_start_token_id": 2} if arch == "bart" else {}
    if arch == "bloom":  # its default init scores every label nearly alike; spread them
        extra["initializer_range"] = 0.3
    base = tiny_model(arch, task_type, seed=1, vocab_size=vocab_size(), **SPECIAL, **extra)
    torch.manual_seed(2)
    model = get_peft_model(base, adapter_config(method, arch, task_type)).eval()
    if method == "prefix_tuning":  # PEFT's prefix init is small: make the prefix matter
        with torch.no_grad():
            for p in model.prompt_encoder.parameters():
                p.normal_(0, 1.0)
    return model


def rank_task(tok, kind="causal_lm_cls", **options):
    spec = task_spec(
        {
            "type": kind,
            "text": "review : {review} label :",
            "target": " {label}",
            "labels": LABELS,
            "decode": "rank",
            **options,
        }
    ).fit(ROWS)
    return spec.build(tok, None)


def reference_scores(model, tok, task, mean: bool, encoder_decoder: bool) -> list[list[float]]:
    """Every (row, label) pair alone: one full forward each, no padding, no cache."""
    out = []
    # as training writes a label: the template's space, the label's tokens, then EOS
    continuations = [
        tok(" " + label, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for label in LABELS
    ]
    assert continuations == task.target_ids(task.label_set.texts)
    for row in ROWS:
        prompt = tok(task.options.prompt_of(row))["input_ids"]
        scores = []
        for cont in continuations:
            with torch.no_grad():
                if encoder_decoder:
                    logits = model(
                        input_ids=torch.tensor([prompt]), labels=torch.tensor([cont])
                    ).logits[0]  # (W, V)
                    lp = torch.log_softmax(logits.float(), -1)
                    token_lp = [lp[j, t] for j, t in enumerate(cont)]
                else:
                    ids = prompt + cont
                    logits = model(input_ids=torch.tensor([ids])).logits
                    logits = input_positions(logits, len(ids))[0]  # virtual tokens dropped
                    lp = torch.log_softmax(logits.float(), -1)
                    token_lp = [lp[len(prompt) - 1 + j, t] for j, t in enumerate(cont)]
            total = float(sum(token_lp))
            scores.append(total / len(cont) if mean else total)
        out.append(scores)
    return out


CAUSAL_CASES = [
    (arch, method)
    for arch in ("llama", "gpt2", "bloom")
    for method in ("lora", "prompt_tuning", "p_tuning", "prefix_tuning")
]


@pytest.mark.parametrize(("arch", "method"), CAUSAL_CASES)
@pytest.mark.parametrize("score", ["sum", "mean"])
def test_batched_rank_equals_one_forward_per_label(tok, arch, method, score):
    model = adapted(arch, method)
    task = rank_task(tok, rank_score=score)
    ctx = EvalContext(model=model, device=torch.device("cpu"), batch_size=3)
    got = task.label_scores(ctx, ROWS)
    want = reference_scores(model, tok, task, score == "mean", encoder_decoder=False)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-4)
    predicted = task.predict(ctx, ROWS)
    assert predicted == [LABELS[max(range(len(s)), key=s.__getitem__)] for s in want]
    assert set(predicted) <= set(LABELS)
    assert not model.training
    with model.disable_adapter():  # the adapter takes part: the base model scores otherwise
        base = task.label_scores(ctx, ROWS)
    assert (torch.tensor(base) - torch.tensor(got)).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["t5", "bart"])
@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "prefix_tuning"])
def test_seq2seq_rank_scores_labels_as_decoder_targets(tok, arch, method):
    model = adapted(arch, method, "SEQ_2_SEQ_LM")
    task = rank_task(tok, kind="seq2seq")
    ctx = EvalContext(model=model, device=torch.device("cpu"), batch_size=3)
    got = task.label_scores(ctx, ROWS)
    want = reference_scores(model, tok, task, mean=False, encoder_decoder=True)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-4)


def test_rank_never_answers_outside_the_label_set_and_scores_them(tok):
    model = adapted("llama", "lora")
    task = rank_task(tok)
    ctx = EvalContext(model=model, device=torch.device("cpu"), batch_size=4)
    result = task.score(ROWS, task.predict(ctx, ROWS), eval_loss=0.0)
    assert result.metrics["invalid_rate"] == 0.0
    assert all(p in LABELS for p in result.predictions)
    assert result.correct == [p == r["label"] for p, r in zip(result.predictions, ROWS)]
    assert result.metrics["accuracy"] == pytest.approx(sum(result.correct) / len(ROWS))


def test_rank_needs_a_label_set_and_known_option_values():
    with pytest.raises(ValueError, match="decode: rank picks the most likely label"):
        task_spec({"type": "causal_lm_gen", "text": "{mr}", "target": "{ref}", "decode": "rank"})
    with pytest.raises(ValueError, match="task.decode must be one of"):
        task_spec({"type": "causal_lm_cls", "text": "{x}", "decode": "beam"})
    with pytest.raises(ValueError, match="task.rank_score must be one of"):
        task_spec({"type": "causal_lm_cls", "text": "{x}", "rank_score": "max"})
