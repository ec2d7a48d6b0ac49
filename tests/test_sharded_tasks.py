"""Every task type trains under ZeRO-3 and FSDP2 with 2 processes and saves a complete adapter
that HF ``peft`` loads with peftkit's outputs.

One ``torchrun`` launch per strategy (``run_recipes.py`` runs the recipes one after another
in the same two fresh workers, gloo): causal_lm, causal_lm_cls, chat (tiny Llama: the
vocabulary-parallel embedding and head), seq_cls, token_cls, qa (BERT: its embeddings block
wrapped without its word embeddings, which FSDP2 gives a unit of their own), seq2seq (T5 and
BART), image_cls (ViT). Each run must report world size 2 and its strategy, have trained
(some ``lora_B`` non-zero), and its adapter, loaded by ``peft`` onto the same base weights,
must give the outputs peftkit's own loader gives (the task's heads restored, rel 1e-5).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tiny_models import tiny_model
from tiny_runs import (
    FOODS,
    NAMES,
    base_config,
    make_model,
    method_block,
    write_conll,
    write_corpus,
    write_e2e,
    write_reviews,
    write_squad,
)

pytest.importorskip("deepspeed")

HERE = Path(__file__).resolve().parent
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
REVIEW_PROMPT = {"text": "review : {review} label :", "target": "{label}"}
TASKS = {
    # name: (model, task block, data file key, LoRA targets (None: the architecture's))
    "causal_lm": ("llama", {"type": "causal_lm", "block_size": 16}, "corpus", None),
    "causal_lm_cls": ("llama", {"type": "causal_lm_cls", **REVIEW_PROMPT}, "reviews", None),
    "chat": ("llama", {"type": "chat", "chat_template": CHAT_TEMPLATE}, "chat", None),
    "seq_cls": ("bert", {"type": "seq_cls", "text": "{review}", "label": "label"}, "reviews", None),
    "token_cls": ("bert", {"type": "token_cls"}, "conll", None),
    "qa": ("bert", {"type": "qa", "max_length": 32}, "squad", None),
    "seq2seq_t5": ("t5", {"type": "seq2seq", "text": "{mr}", "target": "{ref}"}, "e2e", None),
    "seq2seq_bart": (
        "bart",
        {"type": "seq2seq", **REVIEW_PROMPT, "labels": ["negative", "positive"]},
        "reviews",
        None,
    ),
    "image_cls": ("vit", {"type": "image_cls"}, "images", ["q_proj", "v_proj"]),
}
STRATEGIES = ("zero3", "fsdp")


def _chat(path: Path, n: int = 32) -> Path:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            name, food = rng.choice(NAMES), rng.choice(FOODS)
            turns = [
                {"role": "user", "content": f"{name} {food}"},
                {"role": "assistant", "content": f"{name} serves {food} food"},
            ]
            fh.write(json.dumps({"messages": turns}) + "\n")
    return path


def _images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, rgb in {"red": (200, 40, 40), "blue": (50, 60, 210)}.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(10):
            pixels = np.clip(rng.normal(rgb, 40, size=(16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _vit(folder: Path) -> Path:
    import transformers as tf

    tiny_model("vit", "IMAGE_CLS").save_pretrained(folder)
    processor = getattr(tf, "ViTImageProcessorPil", tf.ViTImageProcessor)
    processor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def _data_block(key: str, files: dict[str, Path]) -> dict:
    if key == "corpus":
        return {"train": {"path": str(files[key]), "text_split": "line"}, "eval_size": 6}
    return {"train": str(files[key]), "eval_size": 6}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded_tasks")
    models = {k: make_model(k, root / k) for k in ("llama", "bert", "t5", "bart")}
    models["vit"] = _vit(root / "vit")
    files = {
        "corpus": write_corpus(root / "corpus.txt", n=40),
        "reviews": write_reviews(root / "reviews.csv", n=40),
        "conll": write_conll(root / "ner.conll", n=40),
        "squad": write_squad(root / "squad.json", n=30),
        "e2e": write_e2e(root / "e2e.csv", n_mr=12),
        "chat": _chat(root / "chat.jsonl"),
        "images": _images(root / "images"),
    }
    for strategy in STRATEGIES:
        commands = []
        for name, (model, task, data, targets) in TASKS.items():
            method = method_block("lora", "bert" if model == "vit" else model)
            method["lora_dropout"] = 0.0
            if targets is not None:
                method["target_modules"] = targets
            config = base_config(
                models[model],
                root / f"{name}-{strategy}",
                task,
                _data_block(data, files),
                method,
                batch_size=4,
                max_steps=2,
                epochs=1,
                lr=5e-2,
                plots=False,
                tensorboard=False,
                distributed={"strategy": strategy},
            )
            path = root / f"{name}-{strategy}.yaml"
            path.write_text(yaml.safe_dump(config))
            commands.append(["train", str(path)])
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        args += [str(HERE / "run_recipes.py"), json.dumps(commands)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(args, capture_output=True, text=True, timeout=1200, env=env, cwd=root)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return root


def _outputs(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**batch)
    return {k: v for k, v in out.items() if k.endswith("logits") and torch.is_tensor(v)}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_trains_sharded_and_peft_loads_its_adapter(runs, task, strategy):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    from peftkit.models import load_base_model
    from peftkit.train.inference import (
        find_target,
        load_for_inference,
        restore_task_state,
        run_config,
        spec_for,
    )
    from peftkit.train.splits import load_splits

    run = runs / f"{task}-{strategy}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == strategy
    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert tensors and all(t.numel() > 0 for t in tensors.values())  # gathered, complete
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # it trained

    target = find_target(run)
    config = run_config(target)
    spec = spec_for(config)
    spec = restore_task_state(spec, target) or spec  # the label set, where the task has one
    ours = load_for_inference(target, config, spec)
    rows = load_splits(config).eval[:4]
    batch = ours.task.collate(ours.task.encode(rows))
    if task == "qa":  # peft's QA model drops segment ids (README: "PEFT's own ..."); so do we
        batch.pop("token_type_ids", None)
    base, _ = load_base_model(config.model.name, task=spec.name, **spec.model_kwargs())
    theirs = peft.PeftModel.from_pretrained(base, run / "adapter").eval()
    got, want = _outputs(theirs, batch), _outputs(ours.model, batch)
    assert want and got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
