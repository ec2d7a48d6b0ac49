"""Rank decoding and broken-looking results end to end: `peftkit train` (the trainer's
evaluation), `peftkit eval RUN task.decode=...` and `peftkit generate RUN task.decode=rank`, on a
tiny Llama; and the one-line warning a run log gets when accuracy is 0 while the loss fell."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from peftkit.cli import main
from peftkit.tasks.scoring import broken_result_line
from tiny_runs import base_config, make_model, method_block, write_reviews

LABELS = ["negative", "positive"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank_cli")
    return {
        "llama": make_model("llama", root / "llama"),
        "reviews": write_reviews(root / "reviews.csv", n=40),
    }


def run_config(assets, out: Path, task: dict, method: str = "lora", **top) -> Path:
    config = base_config(
        assets["llama"],
        out,
        {"type": "causal_lm_cls", "text": "review : {review} label :", **task},
        {"train": str(assets["reviews"]), "eval_size": 8, "test": str(assets["reviews"])},
        method_block(method),
        **{"epochs": 1, "plots": False, "tensorboard": False, **top},
    )
    config["data"]["test"] = {"path": str(assets["reviews"]), "limit": 5}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["lora", "prefix_tuning"])
def test_rank_in_train_eval_and_generate(assets, tmp_path, method, capsys):
    out = tmp_path / "run"
    cfg = run_config(assets, out, {"target": " {label}", "decode": "rank"}, method=method)
    assert main(["train", str(cfg)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["invalid_rate"] == 0.0
    state = json.loads((out / "task_state.json").read_text())
    assert state == {"labels": LABELS, "label_texts": [" negative", " positive"]}
    for split in ("eval", "test"):
        rows = read_csv(out / f"predictions_{split}.csv")
        assert rows and {r["prediction"] for r in rows} <= set(LABELS)
    rows = read_csv(out / "predictions_eval.csv")
    assert all(r["correct"] == str(r["prediction"] == r["reference"]).lower() for r in rows)
    assert summary["eval"]["accuracy"] == pytest.approx(
        sum(r["correct"] == "true" for r in rows) / len(rows)
    )
    capsys.readouterr()

    # the saved adapter re-scored by `peftkit eval` gives the trainer's numbers, rank or not
    assert main(["eval", str(out), "--json"]) == 0
    again = last_json(capsys.readouterr().out)
    for key in ("accuracy", "macro_f1", "invalid_rate", "eval_loss"):
        assert again[key] == pytest.approx(summary["eval"][key], abs=1e-6), key
    assert main(["eval", str(out), "task.decode=rank", "task.rank_score=mean", "--json"]) == 0
    assert last_json(capsys.readouterr().out)["invalid_rate"] == 0.0
    assert main(["eval", str(out), "task.decode=generate", "--json"]) == 0
    assert "invalid_rate" in last_json(capsys.readouterr().out)

    # generate: the run's template, filled with each prompt, answered by the likeliest label
    prompts = ["the food was great and staff very nice", "staff very rude"]
    assert main(["generate", str(out), *sum((["--prompt", p] for p in prompts), [])]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 2 and set(printed) <= set(LABELS)
    assert main(["generate", str(out), "task.decode=generate", "--prompt", prompts[0]]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1


def test_a_run_whose_predictions_are_never_labels_says_so_in_one_line(
    assets, tmp_path, capsys, monkeypatch
):
    # one new token can never spell a two-word label: accuracy 0, every prediction invalid,
    # while training lowers the loss; the log says so and shows what the model wrote instead.
    # A tiny random model does not get below ln 2 per token in seconds (the bar for "the
    # targets are learnt", tested on its own below): here the bar is lifted above its losses.
    from peftkit.tasks import scoring

    monkeypatch.setattr(scoring, "LEARNT_LOSS", 10.0)
    labelled = tmp_path / "reviews_two_words.csv"
    rows = read_csv(assets["reviews"])
    for r in rows:
        r["label"] = "very " + {"positive": "good", "negative": "bad"}[r["label"]]
    with open(labelled, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["review", "label"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "run"
    cfg = run_config(
        {**assets, "reviews": labelled},
        out,
        {"target": "{label}", "max_new_tokens": 1},
        epochs=2,
        eval_before_training=True,
    )
    assert main(["train", str(cfg)]) == 0
    log = (out / "train.log").read_text()
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["accuracy"] == 0.0 and evals[-1]["invalid_rate"] == 1.0
    warnings = [line for line in log.splitlines() if "looks broken" in line]
    # after each epoch's evaluation (not before training: no loss to compare yet), and the test
    assert [w.split(":")[0] for w in warnings] == ["eval epoch 1", "eval epoch 2", "test epoch 2"]
    line = warnings[1]
    assert line.startswith("eval epoch 2: warning:") and "label" in line
    assert "['very bad', 'very good']" in line and "Most frequent predictions: '" in line
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0  # re-scored later, it says so too
    assert "looks broken" in capsys.readouterr().out


def test_the_warning_needs_a_falling_loss_no_right_answer_and_no_label_at_all():
    metrics = {"eval_loss": 0.2, "accuracy": 0.0, "invalid_rate": 1.0}
    preds = ["number."] * 5 + ["entity."] * 3 + ["date."] * 2 + ["x"]
    line = broken_result_line(metrics, preds, ["date", "entity", "number"], first_loss=2.5)
    assert line is not None and "\n" not in line
    assert "2.5000 -> 0.2000" in line and "all 11 predictions" in line
    assert "'number.' x5, 'entity.' x3, 'date.' x2; labels: ['date', 'entity', 'number']" in line
    assert "'x'" not in line  # three most frequent only
    assert broken_result_line(metrics, preds, ["a"], first_loss=0.1) is None  # loss rose
    # fell, but not to where greedy decoding writes the targets: still learning, not broken
    assert broken_result_line({**metrics, "eval_loss": 1.5}, preds, ["a"], 2.5) is None
    assert broken_result_line(metrics, preds, ["a"], first_loss=None) is None  # unknown
    assert broken_result_line({**metrics, "accuracy": 0.1}, preds, ["a"], 2.5) is None
    assert broken_result_line({**metrics, "invalid_rate": 0.9}, preds, ["a"], 2.5) is None
