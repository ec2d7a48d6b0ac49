"""task.type chat: conversation layouts, the assistant-only label mask (checked by hand on a
tiny template), packing (same loss as unpacked rows), and `peftkit train` / `eval` /
`generate --chat` end to end on a tiny Llama."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch
import yaml

from peftkit.cli import main
from peftkit.data.chat import conversation
from peftkit.tasks import EvalContext, task_spec
from peftkit.tasks.base import IGNORE_INDEX
from peftkit.tasks.chat import chat_loop, pack
from tiny_models import tiny_model
from tiny_runs import FOODS, NAMES, base_config, make_model, make_tokenizer, vocab_size

# Roles are not in the tiny vocabulary: they read as <unk>, which is fine for a mask test.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", "CAUSAL_LM", hidden=64, ffn=128, vocab_size=vocab_size())


def chat_task(tok, model, **options):
    return task_spec({"type": "chat", "chat_template": TEMPLATE, **options}).build(tok, model)


def test_conversation_layouts():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert conversation({"messages": messages}) == messages
    sharegpt = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    assert conversation({"conversations": sharegpt}) == messages
    alpaca = {"instruction": "Add", "input": "2 + 2", "output": "4"}
    assert conversation(alpaca, system="be brief") == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "Add\n\n2 + 2"},
        {"role": "assistant", "content": "4"},
    ]
    assert conversation({"instruction": "Add", "input": "", "output": "4"})[0]["content"] == "Add"
    with pytest.raises(ValueError, match="'messages' column"):
        conversation({"text": "hi"}, where="data.train row 3")
    with pytest.raises(ValueError, match="role 'bot'"):
        conversation({"messages": [{"role": "bot", "content": "x"}]})


def test_templates_over_columns_score_every_squad_answer(tok, llama):
    task = chat_task(tok, llama, user="{context} Q: {question}", assistant="{answers}")
    row = {"context": "c", "question": "q", "answers": {"text": ["A", "a b"], "answer_start": []}}
    messages = task.options.conversation(row)
    assert messages == [
        {"role": "user", "content": "c Q: q"},
        {"role": "assistant", "content": "A"},
    ]
    assert task.options.references(row, messages[-1]) == ["A", "a b"]
    assert task.options.conversation({"context": "c", "question": "q"})[-1]["role"] == "user"


def test_label_mask_by_hand_multi_turn(tok, llama):
    task = chat_task(tok, llama)
    messages = [
        {"role": "user", "content": "the food was great"},
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "staff very rude"},
        {"role": "assistant", "content": "negative"},
    ]
    ids, labels = task.tokens(messages)
    words = (
        "user : the food was great </s> assistant : positive </s> "
        "user : staff very rude </s> assistant : negative </s>"
    ).split()
    expected = tok.convert_tokens_to_ids([w if w in tok.get_vocab() else "<unk>" for w in words])
    assert ids == expected
    # by hand: words 9-10 "positive </s>" and 19-20 "negative </s>" are learnt, nothing else
    learnt = {9, 10, 19, 20}
    assert [words[k] for k in sorted(learnt)] == ["positive", "</s>", "negative", "</s>"]
    assert labels == [i if k in learnt else IGNORE_INDEX for k, i in enumerate(expected)]
    # the prompt the model answers at inference is exactly the unlearnt part before a turn
    assert task.prompt_ids(messages[:1], new_tokens=4) == expected[:9]


def test_no_chat_template_is_a_clear_error(tok, llama):
    with pytest.raises(ValueError, match="task.chat_template"):
        task_spec({"type": "chat"}).build(tok, llama)


def test_a_template_that_rewrites_earlier_turns_is_refused(tok, llama):
    # shows only the last user turn: earlier turns vanish from the longer render
    rewriting = (
        "{% for m in messages %}{% if loop.last or m['role'] == 'assistant' %}"
        "{{ m['role'] }} : {{ m['content'] }} </s> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    task = task_spec({"type": "chat", "chat_template": rewriting}).build(tok, llama)
    messages = [{"role": "user", "content": "good"}, {"role": "assistant", "content": "positive"}]
    with pytest.raises(ValueError, match="prefix"):
        task.tokens(messages * 2)


def test_packing_gives_the_loss_of_the_unpacked_rows(tok, llama):
    task = chat_task(tok, llama, max_length=64, packing=True)
    assert llama.config.use_cache is False  # transformers sees packed rows only without a cache
    rng = random.Random(0)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"name[{rng.choice(NAMES)}] food[{f}]"},
                {"role": "assistant", "content": f"{rng.choice(NAMES)} serves {f} food"},
            ]
        }
        for f in rng.choices(FOODS, k=6)
    ]
    packed = task.encode(rows)
    plain = chat_task(tok, llama, max_length=64).encode(rows)
    assert pack(plain, 64) == packed
    assert len(packed) < len(plain)
    assert sum(map(len, (f["input_ids"] for f in packed))) == sum(
        len(f["input_ids"]) for f in plain
    )

    def total_nll(features):
        batch = task.collate(features)
        with torch.no_grad():
            out = llama(**batch)
        return float(out.loss) * task.count_targets(batch), task.count_targets(batch)

    nll_plain, n_plain = total_nll(plain)
    nll_packed, n_packed = total_nll(packed)
    assert n_plain == n_packed
    # block-diagonal attention from the position restarts: f32 rounding only
    assert nll_packed == pytest.approx(nll_plain, rel=1e-5)
    # without the restarts conversations would see each other and the loss would differ
    leaky = [{**f, "position_ids": list(range(len(f["input_ids"])))} for f in packed]
    assert total_nll(leaky)[0] != pytest.approx(nll_plain, rel=1e-5)


def test_chat_loop_keeps_the_conversation_and_resets(tok, llama):
    task = chat_task(tok, llama, max_new_tokens=3)
    seen = []
    task.reply = lambda ctx, messages, n: seen.append(list(messages)) or f"r{len(seen)}"
    out: list[str] = []
    ctx = EvalContext(model=llama, device=torch.device("cpu"), batch_size=1)
    lines = ["hello\n", "again\n", "/reset\n", "fresh\n", "/exit\n", "never\n"]
    assert chat_loop(task, ctx, lines, out.append) == 3
    assert out == ["r1", "r2", "(conversation reset)", "r3"]
    assert [m["content"] for m in seen[1]] == ["hello", "r1", "again"]
    assert [m["content"] for m in seen[2]] == ["fresh"]


def _chat_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, food = rng.choice(NAMES), rng.choice(FOODS)
        turns = [
            {"role": "user", "content": f"{name} {food}"},
            {"role": "assistant", "content": f"{name} serves {food} food"},
        ]
        if rng.random() < 0.3:  # some two-turn conversations
            turns += [
                {"role": "user", "content": "food"},
                {"role": "assistant", "content": food},
            ]
        rows.append({"messages": turns})
    return rows


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model = make_model("llama", root / "llama")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _chat_rows(64, 0)))
    config = base_config(
        model,
        root / "run",
        {
            "type": "chat",
            "chat_template": TEMPLATE,
            "metrics": ["exact_match", "rouge_l"],
            "max_new_tokens": 6,
            "packing": True,
            "max_length": 48,
        },
        {"train": str(data), "eval_size": 12},
        {"type": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
        epochs=6,
        lr=5e-2,
        eval_before_training=True,
        plots=False,
        tensorboard=False,
    )
    path = root / "chat.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    return root / "run"


def test_train_lowers_the_answer_loss_and_eval_reproduces_it(chat_run, capsys):
    summary = json.loads((chat_run / "summary.json").read_text())
    log = (chat_run / "train.log").read_text()
    assert "assistant tokens learnt; packed into" in log
    before = float(log.split("before training: eval_loss=")[1].split()[0])
    capsys.readouterr()
    assert main(["eval", str(chat_run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["rows"] == 12
    assert {"exact_match", "rouge_l", "eval_ppl"} <= set(metrics)
    # a random tiny Llama with frozen embeddings learns slowly; the answer loss must still fall
    assert metrics["eval_loss"] < before - 0.2, (metrics["eval_loss"], before)
    assert metrics["exact_match"] == pytest.approx(summary["eval"]["exact_match"])


def test_generate_chat_reads_piped_stdin(chat_run):
    lines = "Alpha thai\nfood\n/reset\nEcho french\n/exit\nnever read\n"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "peftkit",
            "generate",
            str(chat_run),
            "--chat",
            "--max-new-tokens",
            "4",
        ],
        input=lines,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert len(out) == 4, out  # three answers and the reset notice; nothing after /exit
    assert out[2] == "(conversation reset)"
    assert all(len(line.split()) <= 4 for line in out)
