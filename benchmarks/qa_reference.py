"""The reference for ``examples/lora_squad_v1_minilm.yaml``: HF PEFT + a plain PyTorch loop.

Same data, model and hyperparameters as the recipe, none of peftkit's QA code: the windows come
from the tokenizer's overflow as in transformers' ``run_qa.py`` (question whole, context in
``max_length`` windows sharing ``doc_stride`` tokens, each window labelled with the answer's
tokens or [CLS]), the answers from the n-best start/end logits of every window (minimum null
score over the windows for v2), the no-answer threshold from the official SQuAD v2 script's
``find_best_thresh``. Only the EM / F1 of one prediction against its gold answers is peftkit's
(``peftkit.metrics.squad_question_scores``, the official script's normalisation)::

    SQuAD v1.1 train slice ──windows──> MiniLM (+ HF PEFT LoRA | all weights) ──AdamW, linear
      warmup/decay, clip 1.0, 1 epoch──> dev slice: v1 (705 answerable) and v2 (all 1,407)

``--method lora``: ``peft.get_peft_model(LoraConfig(r=16, alpha=32, dropout 0.1, q/k/v/dense))``
with lr 2e-3 (the recipe). ``--method full``: every weight trains (lr 1e-4: 2e-3 makes full
fine-tuning diverge), the upper reference. Training throughput counts non-pad tokens per
second of training steps; memory is the process's peak resident set (``VmHWM``).

Run: ``.venv/bin/python benchmarks/qa_reference.py --method lora`` (about 10 min on 2 busy
cores), then ``--method full``; each merges its entry into ``benchmarks/results/qa_reference.json``
(with ``--peftkit-run DIR``: the peftkit run's summary beside it).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TRAIN = DATA / "qa_squad_v1_train_slice" / "train-v1.1-first11articles.json"
DEV = DATA / "qa_squad_v2_dev_slice" / "squad_v2_dev_first5articles.json"
RESULTS = ROOT / "benchmarks" / "results" / "qa_reference.json"


def read_squad(path: Path) -> list[dict]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for article in doc["data"]:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                answers = [] if qa.get("is_impossible") else qa["answers"]
                out.append(
                    {
                        "id": qa["id"],
                        "question": qa["question"].lstrip(),
                        "context": p["context"],
                        "texts": [a["text"] for a in answers],
                        "starts": [a["answer_start"] for a in answers],
                    }
                )
    return out


def windows(tok, rows, max_length, stride, labels):
    """run_qa.py's prepare_train_features / prepare_validation_features, in one."""
    enc = tok(
        [r["question"] for r in rows],
        [r["context"] for r in rows],
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    feats = []
    for i in range(len(enc["input_ids"])):
        seq = enc.sequence_ids(i)
        offsets = [o if s == 1 else None for o, s in zip(enc["offset_mapping"][i], seq)]
        r = rows[enc["overflow_to_sample_mapping"][i]]
        f = {
            "input_ids": enc["input_ids"][i],
            "token_type_ids": enc["token_type_ids"][i],
            "offsets": offsets,
            "example": enc["overflow_to_sample_mapping"][i],
        }
        if labels:
            s = e = 0
            if r["texts"]:
                a0 = r["starts"][0]
                a1 = a0 + len(r["texts"][0])
                ctx = [k for k, o in enumerate(offsets) if o is not None]
                if offsets[ctx[0]][0] <= a0 and offsets[ctx[-1]][1] >= a1:
                    s = ctx[0]
                    while s <= ctx[-1] and offsets[s][0] <= a0:
                        s += 1
                    s -= 1
                    e = ctx[-1]
                    while e >= ctx[0] and offsets[e][1] >= a1:
                        e -= 1
                    e += 1
            f["start_positions"], f["end_positions"] = s, e
        feats.append(f)
    return feats


def collate(feats, pad_id):
    width = max(len(f["input_ids"]) for f in feats)
    ids = torch.full((len(feats), width), pad_id)
    types = torch.zeros((len(feats), width), dtype=torch.long)
    mask = torch.zeros((len(feats), width), dtype=torch.long)
    for k, f in enumerate(feats):
        n = len(f["input_ids"])
        ids[k, :n] = torch.tensor(f["input_ids"])
        types[k, :n] = torch.tensor(f["token_type_ids"])
        mask[k, :n] = 1
    batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
    if "start_positions" in feats[0]:
        batch["start_positions"] = torch.tensor([f["start_positions"] for f in feats])
        batch["end_positions"] = torch.tensor([f["end_positions"] for f in feats])
    return batch


def postprocess(rows, feats, starts, ends, n_best=20, max_answer=30):
    """run_qa's postprocess_qa_predictions: per example, (best text, best score, min null)."""
    best = {i: ("", -math.inf) for i in range(len(rows))}
    null = {i: math.inf for i in range(len(rows))}
    for f, s, e in zip(feats, starts, ends):
        i, offsets = f["example"], f["offsets"]
        null[i] = min(null[i], s[0] + e[0])
        top_s = sorted(range(len(s)), key=lambda k: -s[k])[:n_best]
        top_e = sorted(range(len(e)), key=lambda k: -e[k])[:n_best]
        for a in top_s:
            for b in top_e:
                if offsets[a] is None or offsets[b] is None or b < a or b - a + 1 > max_answer:
                    continue
                score = s[a] + e[b]
                if score > best[i][1]:
                    best[i] = (rows[i]["context"][offsets[a][0] : offsets[b][1]], score)
    return [(best[i][0], best[i][1], null[i]) for i in range(len(rows))]


def find_best_thresh(preds, scores, na_probs, has_ans):
    """The official SQuAD v2 script's find_best_thresh (answer when na_prob <= thresh)."""
    num_no_ans = sum(1 for h in has_ans if not h)
    cur = best = num_no_ans
    best_thresh = -math.inf
    for i in sorted(range(len(preds)), key=lambda k: na_probs[k]):
        diff = scores[i] if has_ans[i] else (-1 if preds[i] else 0)
        cur += diff
        if cur > best:
            best, best_thresh = cur, na_probs[i]
    return 100.0 * best / len(preds), best_thresh


def evaluate(model, tok, rows, args):
    """One forward pass over every window of ``rows``: v1 scores (always answer) on the
    answerable questions, v2 scores (null threshold 0, and the best one) on all."""
    from peftkit.metrics import squad_question_scores

    start = time.perf_counter()
    feats = windows(tok, rows, args.max_length, args.doc_stride, labels=False)
    model.eval()
    starts, ends = [], []
    with torch.no_grad():
        for k in range(0, len(feats), 32):
            piece = feats[k : k + 32]
            out = model(**collate(piece, tok.pad_token_id))
            for j, f in enumerate(piece):
                n = len(f["input_ids"])
                starts.append(out.start_logits[j, :n].tolist())
                ends.append(out.end_logits[j, :n].tolist())
    answers = postprocess(rows, feats, starts, ends)
    eval_time = round(time.perf_counter() - start, 1)
    model.train()
    golds = [r["texts"] for r in rows]
    spans = [a for a, _, _ in answers]
    answered = squad_question_scores(spans, golds)
    has = [bool(g) for g in golds]
    v1 = [x for x, h in zip(answered, has) if h]
    out_v1 = {
        "questions": len(v1),
        "exact": sum(x for x, _ in v1) / len(v1),
        "f1": sum(x for _, x in v1) / len(v1),
    }
    na = [n - s for _, s, n in answers]
    at0 = squad_question_scores([a if d <= 0 else "" for a, d in zip(spans, na)], golds)
    out_v2 = {
        "questions": len(rows),
        "windows": len(feats),
        "exact": sum(x for x, _ in at0) / len(rows),
        "f1": sum(x for _, x in at0) / len(rows),
        "eval_time_s": eval_time,
    }
    for k, name in enumerate(("exact", "f1")):
        score, thresh = find_best_thresh(spans, [s[k] for s in answered], na, has)
        out_v2[f"best_{name}"], out_v2[f"best_{name}_thresh"] = score / 100.0, thresh
    return out_v1, out_v2


def peak_rss_mb() -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--lr", type=float, help="default: 2e-3 (lora), 1e-4 (full)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="first N train questions (a quick check)")
    p.add_argument("--dev-limit", type=int, help="first N dev questions (a quick check)")
    p.add_argument("--peftkit-run", help="a peftkit run folder to put beside (summary.json)")
    p.add_argument(
        "--keep-token-types",
        action="store_true",
        help="lora: call peft's LoraModel (model.base_model) so BERT's segment ids reach the "
        "model; peft 0.21's QA wrapper drops token_type_ids (every segment 0) otherwise",
    )
    args = p.parse_args()
    lr = args.lr or (2e-3 if args.method == "lora" else 1e-4)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    from transformers import logging as hf_logging

    from peftkit.models import tokenizer_folder

    hf_logging.set_verbosity_error()
    folder = tokenizer_folder("minilm-l6")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForQuestionAnswering.from_pretrained(folder)
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                task_type="QUESTION_ANS",
                r=16,
                lora_alpha=32,
                lora_dropout=0.1,
                target_modules=["query", "key", "value", "dense"],
            ),
        )
    # What the loop calls: the PEFT wrapper, or (--keep-token-types) the LoRA-injected model
    # under it, which passes every input through, as transformers' run_qa.py does.
    forward = model.base_model if args.method == "lora" and args.keep_token_types else model
    params = [q for q in model.parameters() if q.requires_grad]
    trainable = sum(q.numel() for q in params)
    total = sum(q.numel() for q in model.parameters())

    train_rows = read_squad(TRAIN)[: args.limit]
    dev = read_squad(DEV)[: args.dev_limit]
    feats = windows(tok, train_rows, args.max_length, args.doc_stride, labels=True)
    from transformers import get_linear_schedule_with_warmup

    steps = math.ceil(len(feats) / args.batch_size) * args.epochs
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(0.06 * steps), steps)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    tokens, train_s, losses = 0, 0.0, []
    for _ in range(args.epochs):
        order = torch.randperm(len(feats), generator=gen).tolist()
        for k in range(0, len(order), args.batch_size):
            batch = collate([feats[i] for i in order[k : k + args.batch_size]], tok.pad_token_id)
            t0 = time.perf_counter()
            loss = forward(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            train_s += time.perf_counter() - t0
            tokens += int(batch["attention_mask"].sum())
            losses.append(float(loss.detach()))
            if len(losses) % 25 == 0:
                print(f"step {len(losses)}/{steps} loss {sum(losses[-25:]) / 25:.3f}", flush=True)
    v1, v2 = evaluate(forward, tok, dev, args)
    entry = {
        "library": "peft " + __import__("peft").__version__ if args.method == "lora" else "torch",
        "method": args.method,
        "lr": lr,
        "epochs": args.epochs,
        "train_questions": len(train_rows),
        "train_windows": len(feats),
        "steps": steps,
        "trainable_params": trainable,
        "all_params": total,
        "train_time_s": round(train_s, 1),
        "tokens_per_s": round(tokens / train_s, 1),
        "final_loss_mean_25": round(sum(losses[-25:]) / len(losses[-25:]), 4),
        "v1_answerable": v1,
        "v2_all": v2,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "threads": args.threads,
        "token_type_ids": args.method == "full" or args.keep_token_types,
    }
    print(json.dumps(entry, indent=1))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    key = f"reference_{args.method}" + ("_token_types" if args.keep_token_types else "")
    # A quick check on the first N questions keeps its own section: it never replaces a full run.
    section = results.setdefault(f"first_{args.limit}_questions", {}) if args.limit else results
    section[key] = entry
    if args.peftkit_run:
        summary = json.loads((Path(args.peftkit_run) / "summary.json").read_text())
        section["peftkit_lora_summary"] = {
            k: summary.get(k)
            for k in ("eval", "baselines", "tokens_per_s", "train_time_s", "peak_cpu_mb")
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
