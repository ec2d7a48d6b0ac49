"""The training loop: bit-for-bit resume (also after Ctrl-C), accumulation, schedule, batching,
memory reports, checkpoints, best-adapter selection."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from peftkit.train.config import load_config
from peftkit.train.loop import EpochBatches
from peftkit.train.memory import PhaseMemory
from peftkit.train.run import run_train
from peftkit.train.schedule import lr_multiplier, make_scheduler
from peftkit.train.state import list_checkpoints
from tiny_runs import base_config, make_model, method_block, write_corpus, write_reviews


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    return {
        "llama": make_model("llama", root / "llama"),
        "reviews": write_reviews(root / "reviews.csv", n=40),
        "corpus": write_corpus(root / "corpus.txt", n=40),
    }


def cls_config(assets, out, **top):
    task = {"type": "causal_lm_cls", "text": "review : {review} label :", "target": "{label}"}
    data = {"train": str(assets["reviews"]), "eval_size": 8}
    top.setdefault("batch_size", 4)
    top.setdefault("grad_accum", 2)
    top.setdefault("epochs", 3)
    top.setdefault("plots", False)
    return base_config(assets["llama"], out, task, data, method_block("lora"), **top)


def train_losses(out) -> list[tuple[int, float]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def eval_records(out) -> list[dict]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records if r["kind"] == "eval"]


def interrupt_at(step: int):
    def on_step(progress):
        if progress.global_step == step:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C delivers

    return on_step


@pytest.mark.parametrize("stop_step", [6, 8], ids=["mid-epoch", "epoch-end"])
def test_ctrl_c_then_resume_continues_bit_for_bit(assets, tmp_path, stop_step):
    """train(N) == train(k) + Ctrl-C + resume(N-k): same loss curve, evals and final weights."""
    # 32 train rows, batch 4, accumulation 2 -> 4 optimizer steps per epoch, 12 in all;
    # dropout 0.1 makes every step draw from the RNG, so a wrong RNG restore shows.
    # Stopping at the end of epoch 2, with a best epoch before the stop (epoch 2 reaches the
    # highest possible invalid_rate, 1.0, here), covers a resumed run whose best predates it.
    extra = {"metric_for_best": "invalid_rate"} if stop_step == 8 else {}
    full = tmp_path / "full"
    summary = run_train(load_config(None, data=cls_config(assets, full, **extra)))
    assert summary["status"] == "completed" and summary["global_step"] == 12

    cut = tmp_path / "cut"
    # the caller's handler (Python's default; ignored where the test runner was started in the
    # background by a non-interactive shell) is put back, not left as the trainer's
    before = signal.getsignal(signal.SIGINT)
    first = run_train(
        load_config(None, data=cls_config(assets, cut, **extra)), on_step=interrupt_at(stop_step)
    )
    assert first["status"] == "interrupted"
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    ckpt = list_checkpoints(cut)[-1]
    assert (
        json.loads((ckpt / "trainer_state.json").read_text())["progress"]["global_step"]
        == stop_step
    )
    assert len(train_losses(cut)) == stop_step
    second = run_train(load_config(None, data=cls_config(assets, cut, **extra)), resume=True)
    assert second["status"] == "completed" and second["global_step"] == 12

    assert train_losses(cut) == train_losses(full)  # exact float equality, step by step
    assert eval_records(cut) == eval_records(full)
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second["best"] == summary["best"]
    assert second["eval"] == summary["eval"]
    if extra:
        assert summary["best"]["epoch"] <= 2
    assert (cut / "predictions_eval.csv").read_text() == (full / "predictions_eval.csv").read_text()


def test_gradient_accumulation_matches_one_big_batch(assets, tmp_path):
    """Equal-length blocks: 2 micro-batches of 4 give the update of one batch of 8."""

    def config(out, batch, accum):
        task = {"type": "causal_lm", "block_size": 8}
        data = {"train": {"path": str(assets["corpus"]), "text_split": "line"}}
        method = {**method_block("lora"), "lora_dropout": 0.0}
        return load_config(
            None,
            data=base_config(
                assets["llama"],
                out,
                task,
                data,
                method,
                batch_size=batch,
                grad_accum=accum,
                epochs=1,
                max_steps=2,
                plots=False,
                tensorboard=False,
                max_grad_norm=None,
            ),
        )

    run_train(config(tmp_path / "big", 8, 1))
    run_train(config(tmp_path / "acc", 4, 2))
    a = load_file(str(tmp_path / "big" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "acc" / "adapter" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # training did move B


def test_checkpoints_are_pruned_and_best_is_kept(assets, tmp_path):
    out = tmp_path / "run"
    summary = run_train(
        load_config(None, data=cls_config(assets, out, save_total_limit=1, save_steps=1, epochs=2))
    )
    assert [p.name for p in list_checkpoints(out)] == ["step-00000008"]
    best = json.loads((out / "best" / "best.json").read_text())
    evals = [r for r in eval_records(out) if r["epoch"] > 0]
    top = max(evals, key=lambda r: r["accuracy"])  # first epoch wins ties
    assert best["epoch"] == top["epoch"] and best["value"] == top["accuracy"]
    assert summary["adapter_choice"].startswith(f"best (epoch {top['epoch']}")
    # the final adapter is the best epoch's, bit for bit
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    kept = load_file(str(out / "best" / "adapter_model.safetensors"))
    assert all(torch.equal(final[k], kept[k]) for k in final)


def test_existing_run_is_not_overwritten_by_accident(assets, tmp_path):
    out = tmp_path / "run"
    config = cls_config(assets, out, epochs=1, max_steps=1, plots=False)
    run_train(load_config(None, data=config))
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        run_train(load_config(None, data=config))
    assert run_train(load_config(None, data=config), overwrite=True)["status"] == "completed"


def test_epoch_batches_are_a_seeded_permutation_with_skip_and_shards():
    sampler = EpochBatches(10, 3, seed=7)
    sampler.set_epoch(0)
    first = list(sampler)
    assert (
        sorted(i for b in first for i in b) == list(range(10)) and len(first) == len(sampler) == 4
    )
    sampler.set_epoch(0, skip=2)
    assert list(sampler) == first[2:]
    sampler.set_epoch(1)
    assert list(sampler) != first
    shards = [EpochBatches(10, 3, seed=7, num_replicas=2, rank=r) for r in (0, 1)]
    got = [list(s) for s in shards]
    assert len(got[0]) == len(got[1]) == 2
    assert sorted(i for s in got for b in s for i in b) == list(range(10))
    # 3 batches over 2 processes: the list wraps around so both get 2 batches
    odd = [list(EpochBatches(9, 3, seed=7, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(odd[0]) == len(odd[1]) == 2 and odd[1][1] == odd[0][0]


def test_lr_schedule_warms_up_then_decays():
    assert [lr_multiplier(s, "linear", 2, 10) for s in (0, 1, 2, 6, 10)] == [
        0.0,
        0.5,
        1.0,
        0.5,
        0.0,
    ]
    assert lr_multiplier(6, "cosine", 2, 10) == pytest.approx(0.5)
    assert lr_multiplier(9, "constant", 2, 10) == 1.0
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, "linear", 2, 10)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    sched.load_state_dict(torch.load(buf, weights_only=True))  # numbers only: safe to load


_PHASE_PEAK_PROBE = """
import json, time, torch
from peftkit.train.memory import MemoryTracker, cpu_rss_bytes
with MemoryTracker("train") as mem:
    block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
    time.sleep(0.1)  # the anonymous peak is sampled (every 10 ms)
    del block
now = cpu_rss_bytes() // 2**20
r = mem.result
print(json.dumps({"begin": r.cpu_begin, "end": r.cpu_end, "peak": r.cpu_peak, "now": now,
                  "anon_begin": r.cpu_anon_begin, "anon_peak": r.cpu_anon_peak,
                  "anon_end": r.cpu_anon_end, "lines": r.lines()}))
"""


def test_memory_report_sees_a_phase_peak_and_uses_peft_wording():
    # In a fresh interpreter: in this long-lived one, the C allocator may hand the 64 MB back
    # from pages it already holds, and then the resident set (rightly) does not grow.
    proc = subprocess.run(
        [sys.executable, "-c", _PHASE_PEAK_PROBE], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["peak"] - result["begin"] >= 60  # the freed block still counts in the peak
    # the end reading is the RSS at the end (whether the C allocator gave the block back to the
    # OS is its business)
    assert abs(result["end"] - result["now"]) <= 2 and result["end"] <= result["peak"]
    # the anonymous part beside it: the block is anonymous memory
    assert result["anon_peak"] - result["anon_begin"] >= 60
    assert result["anon_begin"] <= result["begin"] and result["anon_peak"] <= result["peak"]
    assert (
        f"CPU Anonymous Memory before entering the train : {result['anon_begin']}"
        in result["lines"]
    )
    assert any(line.startswith("CPU Total Peak Memory consumed") for line in result["lines"])
    lines = PhaseMemory("eval", 100, 110, 150).lines()
    assert "CPU Memory before entering the eval : 100" in lines
    assert "CPU Memory consumed at the end of the eval (end-begin): 10" in lines
    assert "CPU Peak Memory consumed during the eval (max-begin): 50" in lines
    assert "CPU Total Peak Memory consumed during the eval (max): 150" in lines
    gpu = PhaseMemory("train", 0, 0, 0, gpu_begin=1916, gpu_end=1982, gpu_peak=9404).lines()
    assert gpu[0] == "GPU Memory before entering the train : 1916"
    assert "GPU Peak Memory consumed during the train (max-begin): 7488" in gpu


def test_the_run_folder_map_names_what_a_run_writes(tmp_path):
    # one map of the run folder: what prepare_output clears on --overwrite is what RunFolder
    # names, and checkpoints are complete only once their state file is in them
    from peftkit.train.run_folder import RunFolder, prepare_output

    run = RunFolder(tmp_path / "run")
    assert run.checkpoint(8) == run.root / "checkpoints" / "step-00000008"
    assert run.best_tensors.parent == run.best and run.plot("memory").name == "memory.png"
    with pytest.raises(ValueError, match="loss, metrics"):
        run.plot("nope")
    for path in (run.config, run.summary, run.predictions("eval"), run.plot("loss")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    run.checkpoint(2).mkdir(parents=True)  # an interrupted save: no trainer_state.json
    (run.checkpoint(4)).mkdir()
    (run.checkpoint(4) / "trainer_state.json").write_text("{}")
    assert run.complete_checkpoints() == [run.checkpoint(4)] == [run.latest_checkpoint()]
    (run.root / "notes.txt").write_text("mine")
    prepare_output(run.root, resuming=False, overwrite=True)
    assert [p.name for p in run.root.iterdir()] == ["notes.txt"]


def test_a_window_reads_its_numbers_once_per_optimizer_step():
    # micro-batch losses and token counts stay on the device until the step ends; then they
    # come back as the same host numbers the per-batch reads gave, in order
    from peftkit.train.loop import _Window

    window = _Window()
    losses = [torch.tensor(2.5), torch.tensor(1.25, dtype=torch.bfloat16), torch.tensor(0.1)]
    for loss, tokens in zip(losses, (torch.tensor(7), 3, torch.tensor(5)), strict=True):
        window.add(loss, tokens)
    got, tokens, elapsed = window.close()
    assert got == [float(x.float()) for x in losses] and tokens == 15 and elapsed >= 0
    window.reset()
    assert window.losses == [] and window.tokens == []


_NESTED_PEAK_PROBE = """
import json, torch
from peftkit.train.memory import MemoryTracker, StepParts
parts = StepParts()
with MemoryTracker("train") as outer:
    with parts.part("forward"):
        block = torch.ones(96 * 2**20 // 4)  # 96 MB, touched, then freed
        del block
    with parts.part("backward"):  # resets the high-water mark: the outer peak must survive
        small = torch.ones(8 * 2**20 // 4)
        del small
r = parts.add_to(outer.result)
print(json.dumps({"begin": r.cpu_begin, "peak": r.cpu_peak, "parts": r.cpu_parts,
                  "lines": r.lines()}))
"""


def test_step_parts_peaks_and_an_outer_phase_keeps_its_own():
    proc = subprocess.run(
        [sys.executable, "-c", _NESTED_PEAK_PROBE], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    parts = result["parts"]
    assert list(parts) == ["forward", "backward"]
    assert parts["forward"] - result["begin"] >= 90  # the forward's block is its peak
    assert parts["backward"] < parts["forward"] - 60  # the backward's reset forgot it
    assert result["peak"] >= parts["forward"]  # the phase did not: folded before the reset
    line = f"CPU Total Peak Memory in the train's forward / backward (max): {parts['forward']}"
    assert any(s.startswith(line) for s in result["lines"])
    ranks = [{"cpu_parts": {"forward": 5, "backward": 9}}, {"cpu_parts": {"forward": 7}}]
    merged = PhaseMemory.max_over("train", ranks)
    assert merged.cpu_parts == {"forward": 7, "backward": 9}
