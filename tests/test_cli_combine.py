"""`peftkit merge RUN1 RUN2 --weights ...`: adapter arithmetic over trained runs, end to end on
tiny models: the combined run folder, its adapter against add_weighted_adapter in Python (same
seed), eval on it, and the errors for runs that do not combine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import peftkit
from peftkit.cli import main
from tiny_runs import base_config, make_model, method_block, write_reviews

PROMPT = {"type": "causal_lm_cls", "text": "review : {review} label :", "target": "{label}"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two LoRA runs (seeds 1 and 2) on one tiny llama, plus the folders they came from."""
    root = tmp_path_factory.mktemp("combine")
    model = make_model("llama", root / "llama")
    data = {"train": str(write_reviews(root / "reviews.csv", n=32)), "eval_size": 8}
    out = []
    for seed in (1, 2):
        run = root / f"run{seed}"
        config = base_config(model, run, PROMPT, data, method_block("lora"), epochs=1, seed=seed)
        config.update(plots=False, tensorboard=False)
        path = root / f"c{seed}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        assert main(["train", str(path)]) == 0
        out.append(run)
    return root, model, out


def _python_combination(model_dir, adapters, weights, **kwargs):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = peftkit.PeftModel.from_pretrained(base, adapters[0], adapter_name="x0")
    model.load_adapter(adapters[1], adapter_name="x1")
    torch.manual_seed(0)
    model.add_weighted_adapter(["x0", "x1"], weights, "mix", **kwargs)
    model.set_adapter("mix")
    return model.eval()


@pytest.mark.parametrize("combination", ["ties", "dare_linear", "cat"])
def test_combined_run_folder_holds_the_weighted_adapter(runs, tmp_path, combination, capsys):
    root, model_dir, (run1, run2) = runs
    out = tmp_path / "combined"
    args = ["merge", str(run1), str(run2), "--weights", "0.7", "0.5", "--output", str(out)]
    args += ["--combination", combination, "--density", "0.5"]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter",
        "combination.json",
        "config.yaml",
        "task_state.json",
    ]
    record = json.loads((out / "combination.json").read_text())
    assert record["weights"] == [0.7, 0.5] and record["combination_type"] == combination
    assert record["sources"] == [str(run1 / "adapter"), str(run2 / "adapter")]

    from transformers import AutoModelForCausalLM

    expected = _python_combination(
        model_dir,
        [run1 / "adapter", run2 / "adapter"],
        [0.7, 0.5],
        combination_type=combination,
        density=0.5,
    )
    ours = peftkit.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter"
    ).eval()
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=1e-5, atol=1e-6
        )
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0  # the combined folder is a run eval reads
    assert "accuracy=" in capsys.readouterr().out
    assert main(args) == 2  # the output exists: --overwrite
    assert main([*args, "--overwrite"]) == 0


def test_combination_errors_name_the_problem(runs, tmp_path, capsys):
    _, _, (run1, run2) = runs
    out = str(tmp_path / "o")
    capsys.readouterr()
    assert main(["merge", str(run1), str(run2), "--output", out]) == 2
    assert "needs --weights" in capsys.readouterr().err
    assert main(["merge", str(run1), str(run2), "--weights", "1", "--output", out]) == 2
    assert "1 weights for 2 adapters" in capsys.readouterr().err
    assert main(["merge", str(run1), "--density", "0.5", "--output", out]) == 2
    assert "--density: options for combining several runs" in capsys.readouterr().err
    bad = ["merge", str(run1), str(run2), "--weights", "1", "1", "--output", out]
    assert main([*bad, "--combination", "blend"]) == 1
    assert "invalid combination_type 'blend'" in capsys.readouterr().err
    assert main([*bad, "--combination", "ties"]) == 1
    assert "pass density" in capsys.readouterr().err
    assert not Path(out).exists()  # nothing half-written


def test_runs_on_different_bases_do_not_combine(runs, tmp_path, capsys):
    root, _, (run1, run2) = runs
    other = tmp_path / "run2"
    other.mkdir()
    for item in ("adapter", "task_state.json"):
        src = run2 / item
        if src.is_dir():
            import shutil

            shutil.copytree(src, other / item)
        else:
            (other / item).write_bytes(src.read_bytes())
    config = yaml.safe_load((run2 / "config.yaml").read_text())
    config["model"]["name"] = str(root / "elsewhere")
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    args = ["merge", str(run1), str(other), "--weights", "1", "1", "--output", str(tmp_path / "o")]
    assert main(args) == 2
    assert "different base models" in capsys.readouterr().err
