"""Every strategy (DDP, DeepSpeed ZeRO-2/3, FSDP2) trains the same adapter with 2 processes as
1 process with the same global batch and seed, on CPU over gloo, in fresh interpreters started
by ``torchrun`` (never forks of pytest).

Cost: a tiny run is ~1 s of work behind ~10 s of interpreter start and imports, so the 2-process
runs are grouped, one ``torchrun`` launch per group (``run_recipes.py`` runs each recipe through
``peftkit.cli.main`` in the same two workers), and the 1-process references run inside pytest,
one per method, shared by every strategy.

Each 2-process run must: report world size 2 and its strategy in ``summary.json`` (with both
ranks' peak memory), print its report once (rank 0), save the adapter once, complete and
non-empty (ZeRO-3 partitions and FSDP2 shards gathered), in PEFT's format: HF ``peft`` loads it
and gives the same outputs as peftkit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import require
from tiny_runs import base_config, make_model, method_block, write_corpus, write_e2e, write_reviews

require("deepspeed")

HERE = Path(__file__).resolve().parent
# (name, method, strategy, task). Every method under ZeRO-3 (prompt tuning initialised from the
# text's word embeddings, which ZeRO-3 has partitioned at load); a decoder classifier (its
# `score` head copied into modules_to_save from the partitioned weight) and a generating task
# (synced_gpus) under ZeRO-3; LoRA, a prompt method and AdaLoRA under FSDP2; LoRA and QLoRA
# under ZeRO-2 (QLoRA is refused where parameters are sharded). DDP and ZeRO-3 + CPU offload:
# test_train_ddp.py, launched by `accelerate launch` with the shipped configs.
ZERO3 = ("lora", "adalora", "prompt_tuning", "p_tuning", "prefix_tuning")
LAUNCHES: dict[str, list[tuple[str, str, str, str]]] = {
    "zero3": [(f"{m}-zero3", m, "zero3", "lm") for m in ZERO3]
    + [("cls-zero3", "lora", "zero3", "cls"), ("gen-zero3", "lora", "zero3", "gen")]
    + [("rank-zero3", "lora", "zero3", "rank")],
    "fsdp": [(f"{m}-fsdp", m, "fsdp", "lm") for m in ("lora", "prompt_tuning", "adalora")],
    "zero2": [(f"{m}-zero2", m, "zero2", "lm") for m in ("lora", "qlora")],
}
# adapter parity: every run but the prompted ones (their rows differ in length, and DDP-style
# averaging of per-process mean losses weights tokens differently from one process's mean)
RUNS = {n: (m, t) for runs in LAUNCHES.values() for n, m, _, t in runs if t not in ("gen", "rank")}


def _task(root: Path, kind: str) -> tuple[dict, dict]:
    """(task block, data block): a causal LM on lines, a decoder classifier, a generator."""
    if kind == "cls":  # LlamaForSequenceClassification: its `score` head is in modules_to_save
        task = {"type": "seq_cls", "text": "{review}", "label": "label"}
        return task, {"train": str(root / "reviews.csv"), "eval_size": 5}
    if kind == "gen":  # evaluation generates (greedy) and scores the text
        task = {"type": "causal_lm_gen", "text": "{mr} :", "target": "{ref}", "max_new_tokens": 4}
        data = {"train": str(root / "e2e.csv"), "eval_size": 5}
        return task, data
    if kind == "rank":  # evaluation ranks the labels (prompt once, labels as continuations)
        task = {"type": "causal_lm_cls", "text": "review : {review} label :",
                "target": " {label}", "decode": "rank"}  # fmt: skip
        return task, {"train": str(root / "reviews.csv"), "eval_size": 5}
    task = {"type": "causal_lm", "block_size": 8}
    return task, {"train": {"path": str(root / "corpus.txt"), "text_split": "line"}}


def _config(
    root: Path, name: str, method: str, batch: int, strategy: str | None, task="lm", **top
) -> Path:
    task_block, data = _task(root, task)
    block = method_block(method)
    if method in ("lora", "qlora"):
        block["lora_dropout"] = 0.0
    if method == "prompt_tuning":  # the table starts as the text's word embeddings
        block.update(prompt_tuning_init="TEXT", prompt_tuning_init_text="the food was good")
    steps = 4 if method == "adalora" else 2  # AdaLoRA needs steps between tinit and tfinal
    config = base_config(
        root / "llama",
        root / name,
        task_block,
        data,
        block,
        batch_size=batch,
        max_steps=steps,
        epochs=1,
        plots=False,
        tensorboard=False,
        max_grad_norm=None,
    )
    if task in ("cls", "gen", "rank"):  # 5 eval rows in 3 batches: 2 for rank 0, 1 (+ pad) for 1
        config.update(eval_before_training=True, eval_batch_size=2)
    config.update(top)
    if strategy is not None:
        config["distributed"] = {"strategy": strategy}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(root: Path, commands: list[list[str]]) -> dict[int, str]:
    """One ``torchrun`` launch of 2 workers running ``commands``; rank 0's output per command."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args += [str(HERE / "run_recipes.py"), json.dumps(commands)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    pieces = proc.stdout.split("=== RUN ")[1:]
    assert len(pieces) == len(commands), proc.stdout[-2000:]
    return {int(p.split("\n", 1)[0]): p for p in pieces}


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(got: dict, want: dict, rel: float = 1e-4) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].shape == want[key].shape and got[key].numel() > 0, key
        err = (got[key] - want[key]).norm() / want[key].norm().clamp_min(1e-12)
        assert err <= rel, f"{key}: relative error {float(err):.2e}"


def assert_two_process_run(stdout: str, out: Path, strategy: str) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["strategy"] == strategy and summary["offload"] == "none"
    assert [p["rank"] for p in summary["rank_peaks"]] == [0, 1]
    assert all(p["cpu_peak_mb"] > 0 for p in summary["rank_peaks"])
    assert all(len(m["ranks"]) == 2 for m in summary["memory"])
    # rank 0 reports, once: one adapter line, one own + one max-over-ranks memory report
    assert stdout.count("adapter: ") == 1
    assert stdout.count("CPU Total Peak Memory consumed during the train (max):") == 1
    assert stdout.count("CPU Total Peak Memory consumed during the train (max over 2 ranks)") == 1
    assert stdout.count("peftkit train: ") == 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    make_model("llama", root / "llama")
    write_corpus(root / "corpus.txt")
    write_reviews(root / "reviews.csv", n=40)
    write_e2e(root / "e2e.csv", n_mr=12)
    return root


@pytest.fixture(scope="module")
def reference(tiny):
    """The 1-process reference of a (method, task) (the global batch of 8 in one go), trained
    once inside pytest and shared by every strategy's run of it."""
    from peftkit.cli import main

    made: dict[tuple[str, str], Path] = {}

    def get(method: str, task: str = "lm") -> Path:
        if (method, task) not in made:
            name = f"{method}-{task}-one"
            threads = torch.get_num_threads()
            try:
                assert main(["train", str(_config(tiny, name, method, 8, None, task))]) == 0
            finally:
                torch.set_num_threads(threads)
            made[method, task] = tiny / name
        return made[method, task]

    return get


@pytest.fixture(scope="module")
def runs(tiny) -> dict[str, str]:
    """Every 2-process run, one launch per strategy group (batch 4 per process); the ZeRO-3
    launch also trains 4 steps with a checkpoint at step 2, which the last launch resumes.
    Returns rank 0's output of each run by name."""
    out: dict[str, str] = {}
    resume = _config(
        tiny, "z3-full", "lora", 4, "zero3", save_steps=2, save_total_limit=3, max_steps=4
    )
    resumed = _config(tiny, "z3-resumed", "lora", 4, "zero3", max_steps=4)
    step2 = tiny / "z3-full" / "checkpoints" / "step-00000002"
    for group, members in LAUNCHES.items():
        names = [name for name, *_ in members]
        commands = [["train", str(_config(tiny, n, m, 4, s, t))] for n, m, s, t in members]
        if group == "zero3":
            names.append("z3-full")
            commands.append(["train", str(resume)])
        if group == "zero2":  # fresh processes resume the ZeRO-3 run
            names.append("z3-resumed")
            commands.append(["train", str(resumed), "--resume", str(step2)])
        pieces = launch(tiny, commands)
        out.update({name: pieces[i] for i, name in enumerate(names)})
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_make_the_one_process_adapter(tiny, runs, reference, name):
    """2-process == 1-process adapter (rel 1e-4), for every method under ZeRO-3 (AdaLoRA: the
    orthogonality penalty on sharded factors, rank allocation from gathered gradients, the same
    ranks kept; P-tuning: its encoder run inside the gathering; prompt tuning: the TEXT init read
    from the partitioned word embeddings), a classifier whose head was copied into
    modules_to_save from a partitioned weight, LoRA / prompt tuning / AdaLoRA under FSDP2, LoRA
    and QLoRA under ZeRO-2; plus the run's world size, strategy, per-rank memory, rank-0-only
    report, and parameter counts equal to 1 process's (ZeRO-3 counts partitions whole)."""
    method, task = RUNS[name]
    strategy = name.rsplit("-", 1)[1]
    one = reference(method, task)
    assert_two_process_run(runs[name], tiny / name, strategy)
    got = adapter(tiny / name)
    assert_same_adapter(got, adapter(one))
    if method in ("lora", "qlora"):
        assert any(got[k].abs().sum() > 0 for k in got if "lora_B" in k)  # it trained
    if method == "adalora":  # the same ranks were kept
        pattern = json.loads((tiny / name / "adapter" / "adapter_config.json").read_text())
        want = json.loads((one / "adapter" / "adapter_config.json").read_text())
        assert pattern["rank_pattern"] == want["rank_pattern"]
    summary = json.loads((tiny / name / "summary.json").read_text())
    want = json.loads((one / "summary.json").read_text())
    counts = ("trainable_params", "all_params")
    assert [summary[k] for k in counts] == [want[k] for k in counts]
    trained = (
        f"trainable params: {want['trainable_params']:,d} || all params: {want['all_params']:,d}"
    )
    assert trained in runs[name]


def test_prompt_text_init_and_head_copy_read_whole_weights(tiny, runs, reference):
    """Under ZeRO-3 the base weights are empty partitions from the load on: the prompt table
    made from the text's embeddings and the classifier head copied into modules_to_save must
    hold the real values (PEFT's #206/#1633 and #1450 would give empty or garbage tensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "llama")
    ids = tok("the food was good")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny / "llama")
    want = base.get_input_embeddings().weight[torch.tensor((ids * 4)[:4])]
    table = adapter(tiny / "prompt_tuning-zero3")["prompt_embeddings"]
    assert table.shape == want.shape
    # 2 steps at lr 1e-2 move each value by at most ~2e-2 (Adam): still the text's rows
    assert (table - want).abs().max() < 0.05
    head = [k for k in adapter(tiny / "cls-zero3") if k.endswith("score.weight")]
    assert head and adapter(tiny / "cls-zero3")[head[0]].abs().sum() > 0


@pytest.mark.parametrize("name", ["cls-zero3", "gen-zero3", "rank-zero3"])
def test_sharded_evaluation_equals_one_process(tiny, runs, reference, name):
    """Evaluation rows are shared out by batch (5 rows, batches of 2: rank 0 runs batches 0 and
    2, rank 1 batch 1 and a padding batch, ZeRO-3 needing every rank in every forward) and
    gathered in order: before training the scores equal 1 process's exactly (decoded labels;
    greedy generation with synced_gpus; ranked labels), and each eval predictions file has every
    row once, in the 1-process order."""
    import csv

    one = reference("lora", name.split("-")[0])
    assert_two_process_run(runs[name], tiny / name, "zero3")
    got = json.loads((tiny / name / "summary.json").read_text())["before_training"]
    want = json.loads((one / "summary.json").read_text())["before_training"]
    got.pop("time_s"), want.pop("time_s")
    assert got == want and len(got) > 3  # eval_loss, eval_ppl and the task's metrics

    def rows(folder: Path) -> list[dict]:
        with open(folder / "predictions_eval.csv", newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    mine, theirs = rows(tiny / name), rows(one)
    assert len(mine) == 5
    columns = [c for c in theirs[0] if c not in ("prediction", "correct")]
    assert [[r[c] for c in columns] for r in mine] == [[r[c] for c in columns] for r in theirs]


def test_merge_of_a_zero3_run_into_a_plain_base(tiny, runs, tmp_path):
    """``peftkit merge`` of a ZeRO-3 run (one plain process, no DeepSpeed): the merged model
    gives the adapted model's outputs."""
    from transformers import AutoModelForCausalLM

    import peftkit
    from peftkit.cli import main

    assert main(["merge", str(tiny / "lora-zero3"), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ours = peftkit.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny / "llama"), tiny / "lora-zero3" / "adapter"
    ).eval()
    ids = torch.tensor([[2, 10, 11, 12, 13, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, ours(input_ids=ids).logits)


@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
def test_sharded_adapter_loads_in_peft_with_the_same_outputs(tiny, runs, strategy):
    """The gathered adapter is PEFT's format: ``peft.PeftModel`` and peftkit agree on it."""
    import peft
    from transformers import AutoModelForCausalLM

    import peftkit

    folder = tiny / f"lora-{strategy}" / "adapter"
    ids = torch.tensor([[2, 10, 11, 12, 13, 3]])
    theirs = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny / "llama"), folder
    ).eval()
    ours = peftkit.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny / "llama"), folder
    ).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny / "llama").eval()
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, want)
        assert not torch.allclose(base(input_ids=ids).logits, want)  # the adapter does something


def test_qlora_is_refused_where_parameters_are_sharded(tiny):
    from peftkit.train.config import ConfigError, load_config

    for strategy in ("zero3", "fsdp"):
        with pytest.raises(ConfigError, match="ZeRO-3 and FSDP2 cannot cut"):
            load_config(_config(tiny, f"q-{strategy}", "qlora", 4, strategy))


def test_zero3_resume_continues_exactly(tiny, runs):
    """Stopped at step 2 of 4 (DeepSpeed's own per-rank checkpoint of the trainable partitions,
    moments included), resumed by 2 fresh processes: the same adapter as the straight run."""
    step2 = tiny / "z3-full" / "checkpoints" / "step-00000002"
    assert (step2 / "deepspeed").is_dir() and (step2 / "adapter").is_dir()
    assert runs["z3-resumed"].count("resumed from") == 1
    assert_same_adapter(adapter(tiny / "z3-resumed"), adapter(tiny / "z3-full"), rel=1e-6)


def test_eval_batches_are_shared_out_once():
    """Each process runs every world-th batch from its rank (nothing run twice); under sharded
    parameters the shorter share is padded (None) so every rank runs as many forwards."""
    from peftkit.tasks.base import EvalContext

    def ctx(rank: int, lockstep: bool) -> EvalContext:
        return EvalContext(None, torch.device("cpu"), 2, lockstep=lockstep, rank=rank, world=2)

    assert [ctx(r, False).shard(3) for r in (0, 1)] == [[0, 2], [1]]
    assert [ctx(r, True).shard(3) for r in (0, 1)] == [[0, 2], [1, None]]
    assert [ctx(r, True).shard(4) for r in (0, 1)] == [[0, 2], [1, 3]]
    assert ctx(0, True).shard(0) == []
    one = EvalContext(None, torch.device("cpu"), 2)
    assert one.shard(3) == [0, 1, 2] and one.gather([(4, "b"), (0, "a")]) == ["a", "b"]
