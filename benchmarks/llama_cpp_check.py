"""llama.cpp reads peftkit's GGUF exports and continues like peftkit's merged model (not CI).

Needs ``pip install llama-cpp-python`` (builds llama.cpp from source: slow). For a trained chat
run (default: runs/lora_chat_e2e_smollm2, from examples/lora_chat_e2e_smollm2.yaml) it writes

    merged.gguf      peftkit merge RUN --gguf (f32)             the adapter folded in
    base.gguf        the base model alone, f32 (same writer)      for base + LoRA
    adapter.gguf     peftkit export RUN --gguf-lora               llama.cpp's LoRA layout

then generates greedily for a few chat prompts with peftkit's merged PyTorch model and with
llama.cpp on (1) merged.gguf, (2) base.gguf + adapter.gguf, (3) base.gguf alone (a control:
should differ where the adapter matters), (4) the bundled Q4_1 GGUF + adapter.gguf, and prints
the continuations and whether they match.

    .venv/bin/python benchmarks/llama_cpp_check.py [RUN] [--tokens 32] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write one sentence describing this restaurant: name[The Eagle], eatType[coffee shop], "
    "food[French], priceRange[moderate], area[riverside]",
    "Write one sentence describing this restaurant: name[Zizzi], eatType[pub], "
    "customer rating[high], area[city centre], familyFriendly[yes]",
    "What is the capital of France?",
]


def peftkit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "peftkit", *args], check=True, cwd=ROOT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", nargs="?", default=str(ROOT / "runs/lora_chat_e2e_smollm2"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    import torch
    from llama_cpp import Llama

    from peftkit.export import write_model_gguf
    from peftkit.models import load_base_model, resolve_model
    from peftkit.tasks import EvalContext, task_spec
    from peftkit.tasks.chat import ChatTask
    from peftkit.train.inference import find_target, load_for_inference, run_config, spec_for

    torch.set_num_threads(2)
    out = Path(tempfile.mkdtemp(prefix="peftkit-llamacpp-"))
    start = time.perf_counter()
    peftkit("merge", args.run, "--gguf", str(out / "merged.gguf"), "--gguf-dtype", "f32")
    peftkit("export", args.run, "--gguf-lora", str(out / "adapter.gguf"))
    target = find_target(args.run)
    config = run_config(target, [])
    spec = spec_for(config) if config is not None else None
    name = config.model.name if config is not None else "smollm2-135m"
    source = resolve_model(name)
    bundled = Path(source.path) / source.gguf_file
    base, tok = load_base_model(name, dtype="float32")
    write_model_gguf(base, tok, out / "base.gguf", dtype="f32", source_gguf=bundled)
    print(f"exports written to {out} in {time.perf_counter() - start:.0f} s")

    loaded = load_for_inference(target, config, spec)
    task = loaded.task
    if not isinstance(task, ChatTask):  # a bare adapter / other task: the tokenizer's template
        task = task_spec({"type": "chat"}).build(loaded.tokenizer, loaded.model)
    model = loaded.model.merge_and_unload().eval()
    ctx = EvalContext(model=model, device=torch.device("cpu"), batch_size=1)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    prompt_ids = [task.prompt_ids(c, args.tokens) for c in conversations]
    expected = [task.reply(ctx, c, args.tokens) for c in conversations]

    setups = {
        "merged.gguf": {"model_path": str(out / "merged.gguf")},
        "base.gguf + adapter.gguf": {
            "model_path": str(out / "base.gguf"),
            "lora_path": str(out / "adapter.gguf"),
        },
        "base.gguf alone (control)": {"model_path": str(out / "base.gguf")},
        "bundled Q4_1 + adapter.gguf": {
            "model_path": str(bundled),
            "lora_path": str(out / "adapter.gguf"),
        },
    }
    results = {"peftkit merged (PyTorch f32)": expected}
    for name, kwargs in setups.items():
        llm = Llama(n_ctx=1024, n_threads=2, verbose=False, seed=0, **kwargs)
        texts = []
        for ids in prompt_ids:
            completion = llm.create_completion(
                prompt=ids, max_tokens=args.tokens, temperature=0.0, top_k=1
            )
            texts.append(completion["choices"][0]["text"].strip())
        results[name] = texts
        del llm
    for i, prompt in enumerate(PROMPTS):
        print(f"\nprompt {i + 1}: {prompt}")
        for name, texts in results.items():
            same = (
                ""
                if name.startswith("peftkit")
                else ("  [same]" if texts[i] == expected[i] else "  [DIFFERENT]")
            )
            print(f"  {name:30s} {texts[i]!r}{same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"prompts": PROMPTS, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
