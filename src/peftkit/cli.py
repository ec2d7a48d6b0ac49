"""The ``peftkit`` command: one YAML per run, plus ``key=value`` overrides.

::

    peftkit train    CONFIG.yaml [key=value ...] [--resume [CKPT]] [--overwrite] [--check]
    peftkit eval     RUN|CONFIG.yaml [key=value ...] [--split eval|test] [--no-adapter]
    peftkit generate RUN|ADAPTER [key=value ...] (--prompt TEXT ... | --input FILE | --image FILE
                     ... | --chat)   e.g. task.decode=rank: a classifier answers the likeliest label
    peftkit generate T2I_BASE_FOLDER [--lora FILE] --prompt TEXT ...   (images)
    peftkit merge    RUN|ADAPTER [--output DIR] [--gguf OUT.gguf] [--dtype ...]
    peftkit merge    RUN1 RUN2 ... --weights W1 W2 ... [--combination ties --density 0.5]
                     --output OUT     (adapter arithmetic: a combined adapter as a run folder)
    peftkit export   RUN|ADAPTER --gguf-lora OUT.gguf [--dtype f32|f16]
    peftkit inspect  RUN|ADAPTER|CONFIG.yaml [key=value ...]

Exit status: 0 success, 1 a runtime error (message on stderr), 2 a bad config or command line
(every problem listed), 130 training stopped by Ctrl-C after saving a resumable checkpoint.
Set ``PEFTKIT_DEBUG=1`` to see full tracebacks.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

OVERRIDES_HELP = (
    "dotted KEY=VALUE overrides of the config, e.g. method.r=16 epochs=3 lr=3e-4 "
    "data.test.limit=null (values are YAML scalars or [lists])"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftkit",
        description="Parameter-efficient fine-tuning of Hugging Face models "
        "(LoRA, AdaLoRA, QLoRA, prompt tuning, P-tuning, prefix tuning).",
        epilog="Run `peftkit COMMAND --help` for each command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train",
        help="fine-tune an adapter as a YAML config says",
        description="Train an adapter. The config is checked first (unknown keys, wrong types, "
        "missing files, all reported together) before any model is loaded. The run folder gets "
        "the adapter (HF PEFT format), config.yaml, metrics.jsonl, TensorBoard events, "
        "loss.png/metrics.png, predictions CSVs and summary.json. Ctrl-C saves a resumable "
        "checkpoint.",
    )
    p.add_argument("config", help="the run's YAML file (see examples/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue the run in output_dir from its latest checkpoint (or the given "
        "checkpoint / run folder); the loss curve continues exactly as if never stopped",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    p.add_argument(
        "--check",
        action="store_true",
        help="check the config and read the data, then stop (no model is loaded)",
    )

    p = sub.add_parser(
        "eval",
        help="score an adapter on the eval (or test) split",
        description="Evaluate a trained adapter (or, with --no-adapter, the base model) on the "
        "run's eval or test split: loss, perplexity and the task's metrics; writes a predictions CSV.",
    )
    p.add_argument("target", help="a run folder, an adapter folder inside one, or a YAML config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    p.add_argument(
        "--split", choices=("eval", "test"), default="eval", help="which split (default eval)"
    )
    p.add_argument("--adapter", help="use this adapter folder instead of the run's")
    p.add_argument("--no-adapter", action="store_true", help="evaluate the base model alone")
    p.add_argument("--model", help="base model to load instead of the run's")
    p.add_argument("--output", help="predictions CSV (default: <run>/eval_<split>.csv)")
    p.add_argument("--batch-size", type=int, help="evaluation batch size")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")

    p = sub.add_parser(
        "generate",
        help="run an adapter on prompts: text in, text out",
        description="Generate with an adapter. With a run folder whose task has a prompt "
        "template, each input fills the template (as in training) unless --raw; a sequence "
        "or image classifier prints labels.",
    )
    p.add_argument(
        "target",
        help="a run folder or an adapter folder; for images also a text-to-image base folder "
        "(a Stable Diffusion pipeline folder or peftkit's pixel layout)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides of the run's config, e.g. task.decode=rank (a classifier answers the "
        "label with the highest log-likelihood instead of generating text)",
    )
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--input", help="file of inputs: .txt (one per line), .csv/.tsv/.jsonl rows")
    p.add_argument(
        "--image", nargs="+", default=[], metavar="FILE", help="image file(s) to classify"
    )
    p.add_argument(
        "--output",
        help="write results here (.csv, .jsonl or .txt) instead of stdout; text_to_image: the "
        "folder for the PNGs and grid.png (default <run>/generated)",
    )
    p.add_argument(
        "--raw", action="store_true", help="use prompts verbatim, not the run's template"
    )
    p.add_argument("--num-images", type=int, default=4, help="text_to_image: images per prompt")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="text_to_image: image k of a prompt is drawn from seed SEED+k (diffusers: "
        "generator=[torch.Generator().manual_seed(SEED+k) ...])",
    )
    p.add_argument("--negative-prompt", help="text_to_image: the unconditional prompt of guidance")
    p.add_argument(
        "--guidance-scale", type=float, help="text_to_image: classifier-free guidance (1: none)"
    )
    p.add_argument("--steps", type=int, help="text_to_image: denoising steps")
    p.add_argument(
        "--sampler",
        help="text_to_image: folder (the base's scheduler), ddim, ddpm, pndm, euler, euler_a, "
        "dpm++ or a diffusers scheduler class (default: the run's task.sampler)",
    )
    p.add_argument(
        "--lora",
        metavar="FILE",
        help="text_to_image: a LoRA to use instead of the run's adapter: diffusers' "
        "pytorch_lora_weights.safetensors (or a folder with it) or a PEFT adapter folder",
    )
    p.add_argument("--max-new-tokens", type=int, help="generation length")
    p.add_argument("--model", help="base model to load instead of the run's / adapter's")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    p.add_argument("--no-adapter", action="store_true", help="generate with the base model alone")
    p.add_argument(
        "--chat",
        action="store_true",
        help="talk to the model: each stdin line is a user turn rendered with the chat "
        "template (the run's task.chat_template, else the tokenizer's); /reset starts over, "
        "/exit (or end of input) stops",
    )

    p = sub.add_parser(
        "merge",
        help="fold an adapter into its base model, or combine several runs' adapters",
        description="With one run: merge its adapter into the base weights (LoRA: W + (alpha/r) "
        "B A; LoHa, LoKr, IA3 likewise) and save a plain transformers model + tokenizer that "
        "loads with from_pretrained (a QLoRA adapter is merged into the full-precision base). "
        "With several runs and --weights: combine their adapters as HF PEFT's "
        "add_weighted_adapter does (LoRA: --combination svd|linear|cat|ties|dare_linear|"
        "dare_ties|magnitude_prune and their _svd forms; IA3: a weighted sum) and write the "
        "combined adapter as a run folder that eval / generate / merge read.",
    )
    p.add_argument(
        "targets", nargs="+", metavar="target", help="run folder(s) or adapter folder(s)"
    )
    p.add_argument("--output", help="folder for the merged model / the combined run")
    p.add_argument(
        "--weights", type=float, nargs="+", metavar="W", help="combine: one weight per run"
    )
    p.add_argument(
        "--combination",
        metavar="TYPE",
        help="combine (LoRA): svd (default, as PEFT), linear, cat, ties, ties_svd, dare_linear, "
        "dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd",
    )
    p.add_argument(
        "--density", type=float, help="combine: fraction of values kept (ties, dare, magnitude)"
    )
    p.add_argument("--svd-rank", type=int, help="combine: rank of an svd combination")
    p.add_argument("--svd-clamp", type=float, help="combine: quantile to clamp svd factors at")
    p.add_argument(
        "--majority-sign-method", choices=("total", "frequency"), help="combine: ties' sign vote"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="combine: seed of dare's random pruning (default 0)"
    )
    p.add_argument(
        "--gguf",
        metavar="OUT.gguf",
        help="write the merged model as one GGUF file for llama.cpp (weights, tokenizer, "
        "chat template; Llama / Mistral / Qwen2) instead of, or besides, --output",
    )
    p.add_argument(
        "--gguf-dtype", choices=("f16", "f32"), default="f16", help="GGUF weights (default f16)"
    )
    p.add_argument("--model", help="base model to load instead of the run's / adapter's")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="dtype of the saved weights (default: the base model's)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    p = sub.add_parser(
        "export",
        help="write an adapter for local inference (llama.cpp's LoRA GGUF)",
        description="Write a LoRA adapter as a llama.cpp LoRA-adapter GGUF file (tensors "
        "blk.N.<name>.weight.lora_a / lora_b, adapter.lora.alpha), to use with the base "
        "model's GGUF: llama-cli -m BASE.gguf --lora OUT.gguf.",
    )
    p.add_argument("target", help="a run folder or an adapter folder")
    p.add_argument("--gguf-lora", required=True, metavar="OUT.gguf", help="the file to write")
    p.add_argument(
        "--dtype", choices=("f32", "f16"), default="f32", help="A and B tensors (default f32)"
    )
    p.add_argument("--model", help="base model to load instead of the run's / adapter's")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")

    p = sub.add_parser(
        "inspect",
        help="print the model with its adapter modules and the trainable-parameter count",
        description="Print the model structure (PyTorch's print(model)) with the adapter "
        "modules in place, then the trainable-parameter line. A YAML config shows a fresh "
        "adapter as the run would create it; a run or adapter folder shows the saved one.",
    )
    p.add_argument("target", help="a YAML config, a run folder or an adapter folder")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    p.add_argument("--model", help="base model to load instead of the config's / adapter's")
    return parser


# --- commands ----------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from .train.config import load_config
    from .train.run import run_train
    from .train.setup import build_spec, check_data
    from .train.splits import load_splits

    config = load_config(args.config, args.overrides)
    if args.check:
        splits = load_splits(config)
        spec = check_data(build_spec(config), splits, config.source)
        for note in splits.notes:
            print("data " + note)
        labels = list(spec.labels) if spec.labels else None
        print(
            f"config OK: {args.config} (task {spec.name}, method {config.method_type}, "
            f"model {config.model.name}" + (f", labels {labels}" if labels else "") + ")"
        )
        return 0
    summary = run_train(config, resume=args.resume, overwrite=args.overwrite)
    if summary["status"] == "interrupted":
        print(
            f"stopped; continue with: peftkit train {args.config} "
            + " ".join(args.overrides)
            + " --resume",
            file=sys.stderr,
        )
        return 130
    return 0


def _load_target(args: argparse.Namespace, overrides: Sequence[str] = ()):
    """The target, its run config and its task spec (None, None for a bare adapter folder)."""
    from .train.inference import find_target, run_config, spec_for

    target = find_target(args.target)
    if getattr(args, "adapter", None):
        from .train.inference import Target

        target = Target(target.run_dir, Path(args.adapter), target.config_path)
    config = run_config(target, overrides)
    return target, config, spec_for(config)


def cmd_eval(args: argparse.Namespace) -> int:
    from .tasks import EvalContext
    from .train.evaluate import evaluate_split
    from .train.inference import load_for_inference, restore_task_state
    from .train.setup import check_data
    from .train.splits import load_splits

    target, config, spec = _load_target(args, args.overrides)
    if config is None or spec is None:
        raise _usage(
            "eval needs a run folder (with config.yaml) or a YAML config: the task and "
            "data come from it"
        )
    splits = load_splits(config)
    rows = splits.eval if args.split == "eval" else splits.test
    if not rows:
        raise _usage(
            f"the config has no {args.split} split (data.{args.split}"
            + (" or data.eval_size" if args.split == "eval" else "")
            + ")"
        )
    spec = restore_task_state(spec, target) or check_data(spec, splits, config.source)
    if not spec.has_targets(rows):
        raise _usage(
            f"the {args.split} rows carry no references (columns "
            f"{spec.target_columns()}); use `peftkit generate` to label them"
        )
    loaded = load_for_inference(
        target, config, spec, model_name=args.model, use_adapter=not args.no_adapter
    )
    task = loaded.task
    device = torch_device(config)
    loaded.model.to(device)
    ctx = EvalContext(
        model=loaded.model,
        device=device,
        batch_size=args.batch_size or config.eval_batch_size or config.batch_size,
        progress=config.progress,
    )
    evaluation = evaluate_split(ctx, task, rows, phase=args.split)
    metrics = evaluation.metrics
    for line in evaluation.memory.lines():
        print(line)
    what = "base model (no adapter)" if not loaded.has_adapter else f"adapter {target.adapter_dir}"
    print(f"{args.split} on {len(rows)} rows with {what} in {evaluation.time_s:.1f} s:")
    print("  " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    base = task.baselines(splits.train, rows) if splits.train and args.split == "eval" else {}
    line = task.baseline_line(base) if base else None
    if line:
        print("  " + line)
    warning = task.result_warning(metrics, evaluation.result, _first_loss(target))
    if warning:
        print("  " + warning)
    default_csv = (target.run_dir or Path.cwd()) / f"eval_{args.split}.csv"
    out = evaluation.write_predictions(Path(args.output) if args.output else default_csv)
    if out is not None:
        print(f"  predictions: {out}")
    if args.json:
        print(json.dumps({"split": args.split, "rows": len(rows), **metrics, **base}))
    return 0


def _first_loss(target: Any) -> float | None:
    """The run's earliest loss (its metrics.jsonl), to tell whether this eval's loss fell."""
    from .train.logger import first_loss, read_metrics
    from .train.run_folder import RunFolder

    if target.run_dir is None:
        return None
    return first_loss(read_metrics(RunFolder(target.run_dir).metrics))


def _is_image_base(target: str) -> bool:
    """A text-to-image base folder (not a run or adapter folder): generate images from it."""
    from .config import CONFIG_NAME
    from .diffusion import is_text_to_image_folder

    p = Path(target).expanduser()
    if not p.is_dir() or (p / "config.yaml").exists() or (p / CONFIG_NAME).exists():
        return False
    return is_text_to_image_folder(p)


def _write_images(
    args: argparse.Namespace, task: Any, ctx: Any, inputs: list[dict], folder: Path, start: float
) -> int:
    """PNGs + grid.png into ``folder`` with the command line's sampling settings."""
    sampling = task.sampling(
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        sampler=args.sampler,
    )
    if sampling.guidance_scale < 1 or sampling.steps < 1:
        raise _usage("--guidance-scale must be >= 1 and --steps >= 1")
    paths = task.generate_images(ctx, inputs, args.num_images, args.seed, folder, sampling)
    print(f"{len(paths) - 1} image(s) + {paths[-1]} in {time.perf_counter() - start:.1f} s")
    return 0


def _generate_from_base(args: argparse.Namespace) -> int:
    """``peftkit generate BASE_FOLDER [--lora FILE] --prompt ...``: no run needed."""
    from .tasks import EvalContext
    from .train.inference import load_image_base

    if args.image or args.chat:
        raise _usage("a text-to-image base folder takes --prompt / --input, not --image / --chat")
    rows: list[dict[str, Any]] = [{"text": p} for p in args.prompt]
    if args.input:
        rows += _read_inputs(args.input)
    loaded = load_image_base(args.model or args.target, None if args.no_adapter else args.lora)
    try:
        inputs = [loaded.task.spec.input_row(r) for r in rows]
    except ValueError as exc:
        raise _usage(str(exc)) from None
    ctx = EvalContext(model=loaded.model, device=torch_device(), batch_size=args.batch_size)
    loaded.model.to(ctx.device)
    folder = Path(args.output or Path(args.target) / "generated")
    return _write_images(args, loaded.task, ctx, inputs, folder, time.perf_counter())


def _read_inputs(path: str) -> list[dict[str, Any]]:
    from .data import read_records, read_text

    if Path(path).suffix.lower() in (".txt", ".text", ""):
        return [{"text": r["text"]} for r in read_text(path, split="line")]
    return read_records(path)


def cmd_generate(args: argparse.Namespace) -> int:
    """``peftkit generate``, one of four flows: a text-to-image base folder
    (:func:`_generate_from_base`); ``--chat`` (:func:`_chat`, a conversation on stdin); a run
    whose task writes images (:func:`_write_images`: PNGs and a grid); anything else
    (:func:`_generate_texts`: one text per ``--prompt`` / ``--input`` row, or the label an
    image classifier gives each ``--image``)."""
    from .train.inference import load_for_inference, restore_task_state

    if not args.prompt and not args.input and not args.image and not args.chat:
        raise _usage("give --prompt TEXT (repeatable), --input FILE, --image FILE ... or --chat")
    if _is_image_base(args.target):
        if args.overrides:
            raise _usage(
                f"KEY=VALUE overrides ({' '.join(args.overrides)}) are for run folders; a "
                "text-to-image base folder takes --steps / --guidance-scale / --sampler ..."
            )
        return _generate_from_base(args)
    target, config, spec = _load_target(args, args.overrides)
    if args.lora and (spec is None or not spec.kind.writes_images):
        raise _usage("--lora is for text_to_image runs and base folders")
    if args.chat:
        return _chat(args, target, config, spec)
    _check_generate_target(args, target, spec)
    if spec is not None:
        spec = restore_task_state(spec, target) or spec
    rows, inputs, prompts, raw = _generation_inputs(args, spec)
    loaded = load_for_inference(
        target,
        config,
        spec,
        model_name=args.model,
        use_adapter=not args.no_adapter and not args.lora,
    )
    if args.lora:
        from .train.inference import attach_lora_file

        loaded.model = attach_lora_file(loaded.model, args.lora)
        loaded.task = spec.build(loaded.tokenizer, loaded.model)
    from .tasks import EvalContext

    ctx = EvalContext(model=loaded.model, device=torch_device(config), batch_size=args.batch_size)
    loaded.model.to(ctx.device)
    if spec is not None and spec.kind.writes_images:  # text_to_image
        folder = Path(args.output or Path(target.run_dir or target.adapter_dir) / "generated")
        return _write_images(args, loaded.task, ctx, inputs, folder, time.perf_counter())
    return _generate_texts(args, loaded, ctx, rows, inputs, prompts, raw)


def _check_generate_target(args: argparse.Namespace, target: Any, spec: Any) -> None:
    """--image needs a run whose task reads images; an adapter is needed unless --no-adapter."""
    if args.image and (spec is None or not spec.kind.reads_images):
        from .task_types import TASK_TYPES

        image_tasks = " / ".join(k for k, row in TASK_TYPES.items() if row.reads_images)
        raise _usage(f"--image needs a run of task.type {image_tasks}")
    if target.adapter_dir is None and not args.no_adapter:
        raise _usage(
            f"{args.target} has no adapter yet (no adapter/ folder): train first, or "
            "pass --no-adapter to use the base model"
        )


def _generation_inputs(
    args: argparse.Namespace, spec: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str], bool]:
    """``(rows as given, the task's input rows, what to print for each, raw)``: the task reads
    its own inputs; without one (or with --raw on a text model) prompts are plain text."""
    rows: list[dict[str, Any]] = [{"text": p} for p in args.prompt]
    if args.input:
        rows += _read_inputs(args.input)
    rows += [{"image": path} for path in args.image]
    raw = spec is None or (args.raw and spec.kind.writes_text)
    try:
        inputs = [_raw_row(r) if raw else spec.input_row(r) for r in rows]
    except ValueError as exc:
        raise _usage(str(exc)) from None
    prompts = [r["text"] if raw else spec.describe(r) for r in inputs]
    return rows, inputs, prompts, raw


def _generate_texts(
    args: argparse.Namespace,
    loaded: Any,
    ctx: Any,
    rows: list[dict[str, Any]],
    inputs: list[dict[str, Any]],
    prompts: list[str],
    raw: bool,
) -> int:
    """One output per input: plain greedy text (``raw``) or the task's own generation (a
    label, an answer span, a continuation); printed, or written with --output."""
    from .tasks.generation import generate_texts, is_encoder_decoder

    start = time.perf_counter()
    if raw:
        tok = loaded.tokenizer
        outputs = generate_texts(
            ctx,
            tok,
            tok(prompts)["input_ids"],
            max_new_tokens=args.max_new_tokens or 64,
            encoder_decoder=is_encoder_decoder(loaded.model),
        )
    else:
        outputs = loaded.task.generate(ctx, inputs, max_new_tokens=args.max_new_tokens)
    elapsed = time.perf_counter() - start
    if args.output:
        _write_generations(Path(args.output), rows, prompts, outputs)
        print(f"{len(outputs)} generation(s) in {elapsed:.1f} s -> {args.output}")
    else:
        for out in outputs:
            print(out.replace("\n", "\\n"))
    return 0


def _chat(args: argparse.Namespace, target: Any, config: Any, spec: Any) -> int:
    """``generate --chat``: an interactive conversation with the (adapted) model on stdin."""
    from .tasks import EvalContext, task_spec
    from .tasks.chat import ChatTask, chat_loop
    from .train.inference import load_for_inference

    if spec is not None and not spec.kind.writes_text:
        raise _usage(f"--chat needs a text-generating model; this run's task is {spec.name}")
    if target.adapter_dir is None and not args.no_adapter:
        raise _usage(f"{args.target} has no adapter yet: train first, or pass --no-adapter")
    loaded = load_for_inference(
        target, config, spec, model_name=args.model, use_adapter=not args.no_adapter
    )
    task = loaded.task
    if not isinstance(task, ChatTask):  # any causal LM run: the tokenizer's own template
        task = task_spec({"type": "chat"}).build(loaded.tokenizer, loaded.model)
    ctx = EvalContext(model=loaded.model, device=torch_device(config), batch_size=1)
    loaded.model.to(ctx.device)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: type a message; /reset starts over, /exit quits", file=sys.stderr)

    def ask() -> None:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)

    def answer(text: str) -> None:
        print(text, flush=True)

    chat_loop(task, ctx, sys.stdin, answer, max_new_tokens=args.max_new_tokens, prompt=ask)
    return 0


def torch_device(config: Any = None) -> Any:
    """Where eval / generate run: on the CPU when the run's ``device`` says ``cpu`` (or there is
    no GPU), else on the GPU. One rule for every command that runs a model."""
    import torch

    wants_cpu = config is not None and getattr(config, "device", "auto") == "cpu"
    return torch.device("cuda" if torch.cuda.is_available() and not wants_cpu else "cpu")


def _raw_row(row: dict[str, Any]) -> dict[str, Any]:
    if "text" in row:
        return {"text": str(row["text"])}
    raise ValueError(
        "input rows need a 'text' column (or use a run whose template names the columns)"
    )


def _write_generations(
    path: Path, rows: list[dict], prompts: list[str], outputs: list[str]
) -> None:
    from .checkpoint import atomic_write_text

    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        text = "".join(
            json.dumps({**r, "prompt": p, "generation": o}) + "\n"
            for r, p, o in zip(rows, prompts, outputs)
        )
    elif suffix in (".csv", ".tsv"):
        buf = io.StringIO()
        columns = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.writer(buf, delimiter="\t" if suffix == ".tsv" else ",")
        writer.writerow(columns + ["prompt", "generation"])
        for r, p, o in zip(rows, prompts, outputs):
            writer.writerow([r.get(c, "") for c in columns] + [p, o])
        text = buf.getvalue()
    else:
        text = "".join(o.replace("\n", "\\n") + "\n" for o in outputs)
    atomic_write_text(str(path), text)


_COMBINE_ONLY = (
    "weights",
    "combination",
    "density",
    "svd_rank",
    "svd_clamp",
    "majority_sign_method",
)


def cmd_merge(args: argparse.Namespace) -> int:
    if len(args.targets) > 1 or args.weights is not None:
        return _combine(args)
    given = [n for n in _COMBINE_ONLY if getattr(args, n) is not None]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise _usage(f"{flags}: options for combining several runs (give two or more targets)")
    args.target = args.targets[0]
    return _merge_into_base(args)


def _combine(args: argparse.Namespace) -> int:
    from .train.combine import Combination, combine_runs

    if args.weights is None:
        raise _usage(f"combining {len(args.targets)} runs needs --weights (one per run)")
    if args.gguf or args.dtype:
        raise _usage("--gguf / --dtype write a merged model; a combination writes an adapter")
    if not args.output:
        raise _usage("give --output DIR for the combined run folder")
    combination = Combination(
        weights=args.weights,
        combination_type=args.combination,
        density=args.density,
        svd_rank=args.svd_rank,
        svd_clamp=args.svd_clamp,
        majority_sign_method=args.majority_sign_method,
        seed=args.seed,
    )
    out = combine_runs(args.targets, combination, args.output, args.overwrite, args.model)
    print(f"wrote {out} (peftkit eval {out} / peftkit generate {out} / peftkit merge {out})")
    return 0


def _merge_into_base(args: argparse.Namespace) -> int:
    from .train.inference import load_for_inference, restore_task_state

    target, config, spec = _load_target(args)
    if target.adapter_dir is None:
        raise _usage(f"{args.target} holds no adapter to merge")
    if spec is not None:
        spec = restore_task_state(spec, target) or spec
    if not args.output and not args.gguf:
        raise _usage("give --output DIR (a transformers folder) and/or --gguf OUT.gguf")
    if args.gguf and Path(args.gguf).exists() and not args.overwrite:
        raise _usage(f"--gguf {args.gguf} exists; pass --overwrite or another file")
    out = Path(args.output) if args.output else None
    if out is not None and out.exists() and any(out.iterdir()) and not args.overwrite:
        raise _usage(f"--output {out} exists and is not empty; pass --overwrite or another folder")
    loaded = load_for_inference(
        target, config, spec, model_name=args.model, dtype=args.dtype, quantization=False
    )
    merged = loaded.model.merge_and_unload()
    if args.dtype:
        import torch

        merged.to(getattr(torch, args.dtype))
    if args.gguf:
        from .export import write_model_gguf

        path = write_model_gguf(
            merged,
            loaded.tokenizer,
            args.gguf,
            dtype=args.gguf_dtype,
            source_gguf=_source_gguf(args, target, config),
            chat_template=_chat_template(spec),
        )
        print(f"merged {target.adapter_dir} -> {path} (GGUF {args.gguf_dtype}, for llama.cpp)")
    if out is None:
        return 0
    from .checkpoint import atomic_folder

    with atomic_folder(out) as tmp:
        merged.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
    print(
        f"merged {target.adapter_dir} into {type(merged).__name__} -> {out} "
        f"(load with transformers' from_pretrained)"
    )
    return 0


def _base_name(args: argparse.Namespace, target: Any, config: Any) -> str | None:
    from .config import read_config

    if args.model:
        return args.model
    if config is not None:
        return config.model.name
    return read_config(target.adapter_dir).base_model_name_or_path if target.adapter_dir else None


def _source_gguf(args: argparse.Namespace, target: Any, config: Any) -> Path | None:
    """The GGUF file the base model was read from (its tokenizer fields are copied), if any."""
    from .models import resolve_model

    name = _base_name(args, target, config)
    try:
        source = resolve_model(name) if name else None
    except (OSError, ValueError):
        return None
    return Path(source.path) / source.gguf_file if source and source.gguf_file else None


def _chat_template(spec: Any) -> str | None:
    """The run's own chat template (``task.chat_template``), if it set one."""
    template = getattr(getattr(spec, "options", None), "chat_template", None)
    if not template:
        return None
    from .tasks.chat import load_template

    return load_template(template)


def cmd_export(args: argparse.Namespace) -> int:
    from .export import write_lora_gguf
    from .train.inference import load_for_inference, restore_task_state

    target, config, spec = _load_target(args)
    if target.adapter_dir is None:
        raise _usage(f"{args.target} holds no adapter to export")
    if Path(args.gguf_lora).exists() and not args.overwrite:
        raise _usage(f"--gguf-lora {args.gguf_lora} exists; pass --overwrite or another file")
    if spec is not None:
        spec = restore_task_state(spec, target) or spec
    loaded = load_for_inference(target, config, spec, model_name=args.model, quantization=False)
    path = write_lora_gguf(loaded.model, args.gguf_lora, dtype=args.dtype)
    print(
        f"exported {target.adapter_dir} -> {path} (llama.cpp LoRA adapter, {args.dtype}); use "
        "it with the base model's GGUF: llama-cli -m BASE.gguf --lora " + str(path)
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .train.inference import load_for_inference, restore_task_state
    from .train.setup import attach_adapter, check_data, load_model, trainable_line
    from .train.splits import load_splits

    target, config, spec = _load_target(args, args.overrides)
    if target.adapter_dir is None:
        if config is None or spec is None:
            raise _usage(f"{args.target}: nothing to inspect")
        if args.model:
            config.model.name = args.model
        splits = load_splits(config) if config.data.train is not None else None
        restored = restore_task_state(spec, target)
        if restored is not None:
            spec = restored
        elif splits is not None:
            spec = check_data(spec, splits, config.source)
        model, tokenizer = load_model(config, spec)
        total = None
        if splits is not None:  # AdaLoRA's budget schedule needs the run's step count
            from .train.loop import plan_steps

            features = spec.build(tokenizer, model).encode(splits.train)
            total = plan_steps(len(features), config).total_steps
        model = attach_adapter(config, model, spec, total_steps=total)
    else:
        if spec is not None:
            spec = restore_task_state(spec, target) or spec
        # loaded as trainable, so the parameter line counts the adapter as training saw it
        model = load_for_inference(
            target, config, spec, model_name=args.model, trainable=True
        ).model
    print(model)
    print(trainable_line(model))
    return 0


# --- entry point -------------------------------------------------------------------------


class _UsageError(Exception):
    pass


def _usage(message: str) -> _UsageError:
    return _UsageError(message)


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "merge": cmd_merge,
    "export": cmd_export,
    "inspect": cmd_inspect,
}


def _collect_overrides(
    parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]
) -> None:
    """KEY=VALUE overrides may come after options (``--overwrite epochs=3``): argparse leaves
    those over, and ``--resume epochs=3`` would take the override as its checkpoint."""
    if (
        isinstance(getattr(args, "resume", None), str)
        and "=" in args.resume
        and not Path(args.resume).exists()
    ):
        extra = [args.resume, *extra]
        args.resume = True
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    unknown = [e for e in extra if e not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides:
        if not hasattr(args, "overrides"):
            parser.error(f"`peftkit {args.command}` takes no KEY=VALUE overrides: {overrides}")
        args.overrides = [*args.overrides, *overrides]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    _collect_overrides(parser, args, extra)
    from .progress import quiet_library_bars
    from .train.schema import ConfigError

    debug = os.environ.get("PEFTKIT_DEBUG", "") not in ("", "0")
    quiet_library_bars()
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        if debug:
            raise
        print(f"peftkit {args.command}: {exc}", file=sys.stderr)
        return 2
    except _UsageError as exc:
        print(f"peftkit {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"peftkit {args.command}: aborted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        if debug:
            raise
        print(
            f"peftkit {args.command}: error: {exc}\n(set PEFTKIT_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
