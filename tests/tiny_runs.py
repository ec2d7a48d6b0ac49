"""Tiny, randomly initialised models + toy data sets on disk, for end-to-end runs in seconds.

Used by test_cli*.py / test_train*.py / test_tasks*.py. Nothing is downloaded: a word-level
tokenizer is built from the toy data's words (``tokenizers`` WordLevel wrapped in
``PreTrainedTokenizerFast``) and saved next to each model, so ``load_base_model(folder)`` and
``AutoTokenizer.from_pretrained(folder)`` treat the folder like any local checkpoint.

Toy data (seeded, so every run sees the same rows):

* ``reviews.csv``  ``review,label``: "the food was great and staff very nice" -> positive; the
  words decide the label, so even a tiny model can learn it.
* ``e2e.csv``      ``mr,ref``: ``name[Alpha] food[thai]`` -> "Alpha serves thai food", with two
  references per meaning representation (as E2E NLG has several).
* ``corpus.txt``   plain sentences for causal language modelling.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from tiny_models import tiny_model

POSITIVE = ["great", "nice", "good", "lovely"]
NEGATIVE = ["awful", "poor", "bad", "rude"]
NAMES = ["Alpha", "Bravo", "Cobalt", "Delta", "Echo", "Fig"]
FOODS = ["thai", "french", "indian", "italian"]
FILLER = "the food was and staff very review label mr ref serves name food".split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
LABELS = ["positive", "negative"]


def _words() -> list[str]:
    extra = [f"name[{n}]" for n in NAMES] + [f"food[{f}]" for f in FOODS]
    return sorted(set(POSITIVE + NEGATIVE + NAMES + FOODS + FILLER + LABELS + extra + [":", ","]))


def make_tokenizer(folder: Path, token_type_ids: bool = False):
    """A word-level fast tokenizer (pad 0, unk 1, bos 2, eos 3) saved in ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + _words())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    names = (
        ["input_ids", "token_type_ids", "attention_mask"]
        if token_type_ids
        else ["input_ids", "attention_mask"]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_input_names=names,
    )
    fast.save_pretrained(folder)
    return fast


def vocab_size() -> int:
    return len(SPECIALS) + len(_words())


def make_model(kind: str, folder: Path) -> Path:
    """Save a tiny ``llama`` / ``bert`` / ``t5`` / ``bart`` with its tokenizer into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    v = vocab_size()
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    if kind == "llama":
        # 64-wide so every Linear fits NF4's 64-weight blocks (QLoRA runs quantise it)
        model = tiny_model(
            "llama",
            "CAUSAL_LM",
            hidden=64,
            ffn=128,
            vocab_size=v,
            max_position_embeddings=256,
            **ids,
        )
    elif kind == "bert":  # the bare encoder: each task puts its own head on it
        model = tiny_model(
            "bert",
            "FEATURE_EXTRACTION",
            ffn=64,
            vocab_size=v,
            max_position_embeddings=128,
            pad_token_id=0,
        )
    elif kind == "t5":
        model = tiny_model(
            "t5", "SEQ_2_SEQ_LM", ffn=64, vocab_size=v, pad_token_id=0, eos_token_id=3
        )
    elif kind == "bart":
        model = tiny_model(
            "bart",
            "SEQ_2_SEQ_LM",
            ffn=64,
            vocab_size=v,
            max_position_embeddings=128,
            decoder_start_token_id=3,
            **ids,
        )
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    make_tokenizer(folder, token_type_ids=kind == "bert")
    return folder


def write_reviews(path: Path, n: int = 48, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(LABELS)
        a, b = rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2)
        rows.append({"review": f"the food was {a} and staff very {b}", "label": label})
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["review", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_e2e(path: Path, n_mr: int = 12, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n_mr):
        name, food = rng.choice(NAMES), rng.choice(FOODS)
        mr = f"name[{name}] , food[{food}]"
        rows.append({"mr": mr, "ref": f"{name} serves {food} food"})
        rows.append({"mr": mr, "ref": f"the {food} food was {rng.choice(POSITIVE)}"})
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["mr", "ref"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_conll(path: Path, n: int = 40, seed: int = 0) -> Path:
    """Sentences tagged BIO: restaurant names are ``B-name``, cuisines ``B-food``, the rest ``O``."""
    rng = random.Random(seed)
    blocks = []
    for _ in range(n):
        name, food, word = rng.choice(NAMES), rng.choice(FOODS), rng.choice(POSITIVE + NEGATIVE)
        pairs = [(name, "B-name"), ("serves", "O"), (food, "B-food"), ("food", "O")]
        if rng.random() < 0.5:
            pairs += [("and", "O"), ("staff", "O"), ("very", "O"), (word, "O")]
        blocks.append("\n".join(f"{w}\t{t}" for w, t in pairs))
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


def write_squad(path: Path, n: int = 30, seed: int = 0) -> Path:
    """SQuAD v2 JSON: contexts "<Name> serves <food> food and staff very <word>"; question
    "name" is answered by the name, "food" by the cuisine, "review" is unanswerable."""
    import json

    rng = random.Random(seed)
    paragraphs = []
    for k in range(n):
        name, food, word = rng.choice(NAMES), rng.choice(FOODS), rng.choice(POSITIVE + NEGATIVE)
        context = f"{name} serves {food} food and staff very {word}"
        qas = [
            {"id": f"{k}n", "question": "name", "answers": [{"text": name, "answer_start": 0}]},
            {
                "id": f"{k}f",
                "question": "food",
                "answers": [{"text": food, "answer_start": context.index(f" {food} ") + 1}],
            },
            {"id": f"{k}r", "question": "review", "answers": [], "is_impossible": True},
        ]
        paragraphs.append({"context": context, "qas": qas})
    doc = {"version": "v2.0", "data": [{"title": "toy", "paragraphs": paragraphs}]}
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def write_corpus(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [
        f"{rng.choice(NAMES)} serves {rng.choice(FOODS)} food and staff very "
        f"{rng.choice(POSITIVE + NEGATIVE)}"
        for _ in range(n)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# Method blocks that fit the tiny models, per architecture's attention projection names.
TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}


# IA3: PEFT's defaults per architecture (keys, values, the feed-forward output's input)
IA3_TARGETS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "bart": (["k_proj", "v_proj", "fc2"], ["fc2"]),
}


def method_block(method: str, arch: str = "llama") -> dict:
    targets = TARGETS[arch]
    if method in ("loha", "lokr"):
        return {"type": method, "r": 4, "alpha": 8, "target_modules": targets}
    if method == "ia3":
        ia3, feedforward = IA3_TARGETS[arch]
        return {"type": method, "target_modules": ia3, "feedforward_modules": feedforward}
    if method in ("lora", "qlora"):
        return {
            "type": method,
            "r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.1,
            "target_modules": targets,
        }
    if method == "adalora":
        return {
            "type": method,
            "init_r": 6,
            "target_r": 2,
            "tinit": 1,
            "tfinal": 1,
            "deltaT": 1,
            "lora_alpha": 8,
            "target_modules": targets,
        }
    if method == "prompt_tuning":
        return {"type": method, "num_virtual_tokens": 4}
    if method == "p_tuning":
        return {"type": method, "num_virtual_tokens": 4, "encoder_hidden_size": 16}
    if method == "prefix_tuning":
        return {"type": method, "num_virtual_tokens": 4}
    raise ValueError(method)


def base_config(
    model_dir: Path, out_dir: Path, task: dict, data: dict, method: dict, **top
) -> dict:
    """A run config mapping for the tiny runs: 1 thread, no progress bar, a few steps."""
    config = {
        "model": {"name": str(model_dir)},
        "task": task,
        "data": data,
        "method": method,
        "output_dir": str(out_dir),
        "epochs": 2,
        "lr": 1e-2,
        "batch_size": 8,
        "num_threads": 1,
        "progress": False,
        "tensorboard": True,
        "plots": True,
    }
    config.update(top)
    return config
