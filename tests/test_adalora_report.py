"""The AdaLoRA rank report: a table of final ranks and a heatmap PNG (blocks x modules)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from peftkit import AdaLoraConfig, LoraConfig, get_peft_model
from peftkit.methods.adalora_report import final_ranks, plot_rank_heatmap, rank_grid, rank_report

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _trained(tiny_model):
    base, inputs = tiny_model("llama")
    cfg = AdaLoraConfig(
        task_type="CAUSAL_LM",
        target_modules=TARGETS,
        init_r=6,
        target_r=2,
        total_step=8,
        tinit=1,
        tfinal=2,
    )
    model = get_peft_model(base, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    batch = {**inputs, "labels": inputs["input_ids"]}
    model.train()
    for step in range(1, 7):
        model(**batch).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    return model


def test_table_shows_the_rank_pattern(tiny_model):
    model = _trained(tiny_model)
    pattern = model.peft_config["default"].rank_pattern
    ranks = final_ranks(model)
    assert ranks == {k.removesuffix(".lora_E.default"): sum(v) for k, v in pattern.items()}
    rows, cols, grid = rank_grid(ranks)
    assert rows == ["model.layers.0", "model.layers.1"] and cols == TARGETS
    assert grid[1][2] == ranks["model.layers.1.mlp.down_proj"]

    table = rank_report(model)
    print(table)
    lines = table.splitlines()
    assert "allocated" in lines[0] and "init_r=6" in lines[0] and "target_r=2" in lines[0]
    assert f"kept {sum(ranks.values())} of 36 triplets (target budget 12)" in lines[1]
    row0 = next(line for line in lines if line.startswith("model.layers.0 "))
    assert row0.split()[1:] == [
        str(ranks[f"model.layers.0.{c}"])
        for c in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    ]


def test_untrained_model_reports_full_rank(tiny_model):
    base, _ = tiny_model("llama")
    model = get_peft_model(
        base, AdaLoraConfig(target_modules=["q_proj"], init_r=5, target_r=2, total_step=10)
    )
    assert set(final_ranks(model).values()) == {5}
    assert "not allocated yet" in rank_report(model)


def test_heatmap_png_is_written_atomically(tiny_model, tmp_path):
    model = _trained(tiny_model)
    out = plot_rank_heatmap(model, tmp_path / "plots" / "ranks.png")
    assert out == os.fspath(tmp_path / "plots" / "ranks.png")
    data = (tmp_path / "plots" / "ranks.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert os.listdir(tmp_path / "plots") == ["ranks.png"]  # no temp file left behind


def test_report_refuses_a_lora_model(tiny_model):
    base, _ = tiny_model("llama")
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="need an AdaLoRA model"):
        rank_report(model)


def test_ranks_read_either_rank_pattern_key_spelling(tiny_model):
    model = _trained(tiny_model)
    config = model.peft_config["default"]
    expected = final_ranks(model)
    config.rank_pattern = {k.removesuffix(".default"): v for k, v in config.rank_pattern.items()}
    assert final_ranks(model) == expected  # "<path>.lora_E" (files, older peftkit)
    assert final_ranks(model.base_model) == expected  # the AdaLoraModel itself is accepted too


@pytest.mark.parametrize("plots", [True, False])
def test_write_run_report_writes_the_table_and_heatmap(plots, tiny_model, tmp_path):
    model = _trained(tiny_model)
    table, summary = model.base_model.write_run_report(tmp_path, plots=plots)
    assert table == rank_report(model)
    assert (tmp_path / "adalora_ranks.txt").read_text() == table + "\n"
    ranks = final_ranks(model)
    assert summary["ranks"] == ranks and summary["kept"] == sum(ranks.values())
    assert summary["mean_rank"] == round(sum(ranks.values()) / len(ranks), 3)
    png = tmp_path / "adalora_ranks.png"
    if plots:
        assert summary["heatmap"] == os.fspath(png) and png.read_bytes()[:4] == b"\x89PNG"
    else:
        assert "heatmap" not in summary and not png.exists()
    json.dumps(summary)  # goes into the run's summary.json as is
    written = ["adalora_ranks.png", "adalora_ranks.txt"] if plots else ["adalora_ranks.txt"]
    assert sorted(os.listdir(tmp_path)) == written  # no temp files left behind
