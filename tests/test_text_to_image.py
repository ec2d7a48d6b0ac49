"""`task.type: text_to_image` on a tiny pixel-space UNet (built from a config, 8x8 grey images)
with a tiny BERT text encoder: LoRA on the UNet equal to PEFT's, the adapter in diffusers'
layout read by diffusers (and a diffusers-saved LoRA read by peftkit), `peftkit train` end to end
(adapter, both weight files, sample grids, judged samples), DoRA and AdaLoRA, resume, generate,
prompt methods refused, bad inputs named."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import require
from peftkit.cli import main
from tiny_runs import base_config

diffusers = require("diffusers")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=4, norm_num_groups=8)  # fmt: skip
DIGITS = ("1", "2")
LORA = {"type": "lora", "r": 4, "lora_alpha": 8, "target_modules": TARGETS}


def tiny_unet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**UNET).eval()


def digit_image(digit: str, rng: np.random.Generator) -> np.ndarray:
    """8x8 grey: "1" a vertical bar, "2" a horizontal one, plus noise."""
    a = rng.integers(0, 40, (8, 8)).astype(np.uint8)
    if digit == "1":
        a[1:7, 3:5] = 220
    else:
        a[3:5, 1:7] = 220
    return a


def write_folder(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for d in DIGITS:
        (root / d).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(digit_image(d, rng)).save(root / d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A base folder (unet/, scheduler/, text_encoder/ with a tiny BERT + MiniLM's tokenizer),
    image folders, a captions CSV and a (random) judge."""
    import transformers as tf

    from peftkit.diffusion import ImageJudge
    from peftkit.models import resolve_model

    root = tmp_path_factory.mktemp("t2i")
    base = root / "base"
    tiny_unet().save_pretrained(base / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=100).save_pretrained(base / "scheduler")
    torch.manual_seed(0)
    bert = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=30522))  # fmt: skip
    bert.save_pretrained(base / "text_encoder")
    tok = tf.AutoTokenizer.from_pretrained(resolve_model("minilm-l6").path)
    tok.save_pretrained(base / "text_encoder")
    train = write_folder(root / "train", per_class=6, seed=0)
    evals = write_folder(root / "eval", per_class=2, seed=1)
    tables = {}
    for split, folder, n in (("csv", train, 6), ("eval_csv", evals, 2)):
        tables[split] = root / f"{split}.csv"
        with open(tables[split], "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image", "caption"])
            for d in DIGITS:
                for i in range(n):
                    w.writerow([str(folder / d / f"{i}.png"), f"a handwritten {d}"])
    torch.manual_seed(0)
    judge = ImageJudge(list(DIGITS), channels=1, size=8).save(root / "judge")
    return {"root": root, "base": base, "train": train, "eval": evals, "judge": judge, **tables}


def write_config(assets, name: str, method: dict, task: dict | None = None, **top) -> Path:
    task = {"type": "text_to_image", "caption_template": "a handwritten {label}",
            "samples_per_prompt": 2, "sample_steps": 2, "grid_scale": 1, **(task or {})}  # fmt: skip
    config = base_config(
        assets["base"],
        assets["root"] / "runs" / name,
        task,
        {"train": str(assets["train"]), "eval": str(assets["eval"])},
        method,
        **{"epochs": 2, "batch_size": 4, "lr": 1e-2, "plots": False, **top},
    )
    path = assets["root"] / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return path


def summary(assets, name: str) -> dict:
    return json.loads((assets["root"] / "runs" / name / "summary.json").read_text())


def noise_pred(unet, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, 8, 8, generator=g)
    states = torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 70]), states).sample


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def randomise(model, seed: int = 5) -> None:
    """Non-zero LoRA factors (B starts at 0: an untrained adapter changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# --- LoRA on the UNet: same weights => same noise prediction as PEFT ---------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_lora_on_unet_matches_peft(tmp_path, dora):
    import peft

    import peftkit

    ours = peftkit.get_peft_model(
        tiny_unet(), peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=dora)
    )
    randomise(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_unet(), tmp_path / "ours")
    assert rel_err(noise_pred(ours), noise_pred(theirs)) <= 1e-5
    assert rel_err(noise_pred(ours), noise_pred(tiny_unet())) > 1e-3  # the adapter does act

    peft_model = peft.get_peft_model(
        tiny_unet(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=dora)
    )
    randomise(peft_model, seed=7)
    peft_model.save_pretrained(tmp_path / "peft")
    back = peftkit.PeftModel.from_pretrained(tiny_unet(), tmp_path / "peft")
    assert rel_err(noise_pred(back), noise_pred(peft_model)) <= 1e-5


# --- diffusers' LoRA file, both ways -----------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_our_diffusers_file_loads_in_diffusers(tmp_path, dora):
    from diffusers import StableDiffusionPipeline

    import peftkit
    from peftkit.diffusion import save_diffusers_lora

    ours = peftkit.get_peft_model(
        tiny_unet(), peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=dora)
    )
    randomise(ours)
    path = save_diffusers_lora(ours, tmp_path)
    assert path.name == "pytorch_lora_weights.safetensors"
    # what pipeline.load_lora_weights does: lora_state_dict, then load_lora_into_unet
    state, alphas, meta = StableDiffusionPipeline.lora_state_dict(
        tmp_path, return_lora_metadata=True
    )
    assert all(k.startswith("unet.") for k in state) and meta["unet.lora_alpha"] == 8
    unet = tiny_unet()
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, metadata=meta)
    assert rel_err(noise_pred(unet), noise_pred(ours)) <= 1e-5
    plain = tiny_unet()
    plain.load_lora_adapter(str(tmp_path), prefix="unet", weight_name=path.name)  # model-level
    assert rel_err(noise_pred(plain), noise_pred(ours)) <= 1e-5


@pytest.mark.parametrize("metadata", [True, False])
def test_diffusers_saved_lora_loads_in_peftkit(tmp_path, metadata):
    """A LoRA diffusers wrote (with its config in the header, or without: alpha = rank)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from peftkit.diffusion import load_diffusers_lora, read_diffusers_lora

    unet = tiny_unet()
    alpha = 8 if metadata else 4
    config = LoraConfig(r=4, lora_alpha=alpha, target_modules=TARGETS)
    unet.add_adapter(config)
    randomise(unet)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=config.to_dict() if metadata else None,
    )
    expected = noise_pred(unet)
    ours = load_diffusers_lora(tiny_unet(), tmp_path)
    assert rel_err(noise_pred(ours), expected) <= 1e-5
    read, _ = read_diffusers_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert (read.r, read.lora_alpha) == (4, alpha)


def test_adalora_has_no_diffusers_layout():
    import peftkit
    from peftkit.diffusion.diffusers_lora import to_diffusers

    model = peftkit.get_peft_model(
        tiny_unet(),
        peftkit.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=TARGETS),
    )
    with pytest.raises(ValueError, match="ADALORA: diffusers' LoRA files hold LoRA / DoRA"):
        to_diffusers(model.adapter_state_dict(), model.active_peft_config)


# --- the model: loss targets follow the scheduler ----------------------------------------------
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_denoising_loss_target(assets, kind):
    from peftkit.diffusion import load_text_to_image

    model, _ = load_text_to_image(assets["base"])
    model.noise_scheduler.register_to_config(prediction_type=kind)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1, torch.randn(2, 1, 8, 8, generator=g)
    t = torch.tensor([5, 60])
    batch = model.tokenize(["a handwritten 1", "a handwritten 2"])
    out = model(pixel_values=x0, noise=noise, timesteps=t, **batch)
    sched = model.noise_scheduler
    target = noise if kind == "epsilon" else sched.get_velocity(x0, noise, t)
    with torch.no_grad():
        states = model.encode_prompt(batch["prompt_ids"], batch["prompt_mask"])
        pred = model(sched.add_noise(x0, noise, t), t, states,
                     encoder_attention_mask=batch["prompt_mask"]).sample  # fmt: skip
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(pred, target))


# --- peftkit train end to end ------------------------------------------------------------------
def test_train_lora_end_to_end(assets, capsys):
    import peft

    path = write_config(assets, "lora", LORA, {"classifier": str(assets["judge"])},
                        eval_before_training=True)  # fmt: skip
    assert main(["train", str(path)]) == 0
    run = assets["root"] / "runs" / "lora"
    out = summary(assets, "lora")
    assert out["status"] == "completed" and out["task"] == "text_to_image"
    assert {"eval_loss", "recognised", "recognised/1", "recognised/2"} <= set(out["eval"])
    assert "eval_ppl" not in out["eval"]  # a denoising MSE has no perplexity
    assert "recognised" in out["before_training"] and out["best"]["metric"] == "recognised"
    for name in ("adapter_config.json", "adapter_model.safetensors",
                 "pytorch_lora_weights.safetensors"):  # fmt: skip
        assert (run / "adapter" / name).is_file()
    for name in ("samples_before.png", "samples_after.png"):
        with Image.open(run / name) as im:
            assert im.size[0] > 16 and im.mode == "L"  # 2 prompts x 2 samples of 8x8
    with open(run / "predictions_eval.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {r["reference"] for r in rows} == set(DIGITS)
    # PEFT loads the adapter into a plain diffusers UNet: the same noise prediction
    from peftkit.diffusion import load_text_to_image
    from peftkit.train.inference import find_target, load_for_inference, run_config, spec_for

    target = find_target(run)
    config = run_config(target)
    loaded = load_for_inference(target, config, spec_for(config))
    theirs = peft.PeftModel.from_pretrained(diffusers.UNet2DConditionModel.from_pretrained(
        assets["base"] / "unet"), run / "adapter")  # fmt: skip
    assert rel_err(noise_pred(loaded.model), noise_pred(theirs)) <= 1e-5
    assert rel_err(noise_pred(theirs), noise_pred(load_text_to_image(assets["base"])[0])) > 1e-4

    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["recognised"] == out["eval"]["recognised"]
    assert result["eval_loss"] == pytest.approx(out["eval"]["eval_loss"], rel=1e-6)
    gen = assets["root"] / "gen"
    assert main(["generate", str(run), "--prompt", "a handwritten 1", "--prompt",
                 "a handwritten 2", "--num-images", "3", "--seed", "0", "--output",
                 str(gen)]) == 0  # fmt: skip
    files = sorted(p.name for p in gen.iterdir())
    assert files == ["a_handwritten_1_0.png", "a_handwritten_1_1.png", "a_handwritten_1_2.png",
                     "a_handwritten_2_0.png", "a_handwritten_2_1.png", "a_handwritten_2_2.png",
                     "grid.png"]  # fmt: skip
    first = np.asarray(Image.open(gen / "a_handwritten_1_0.png"))
    assert main(["generate", str(run), "--prompt", "a handwritten 1", "--num-images", "1",
                 "--output", str(gen / "again")]) == 0  # fmt: skip
    assert np.array_equal(first, np.asarray(Image.open(gen / "again" / "a_handwritten_1_0.png")))


@pytest.mark.parametrize(
    "name,method",
    [("dora", {**LORA, "use_dora": True}),
     ("adalora", {"type": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1,
                  "deltaT": 1, "target_modules": TARGETS}),
     ("text_encoder", {**LORA, "target_modules": [*TARGETS, "query", "value"]})],
)  # fmt: skip
def test_other_methods_and_csv_captions(assets, name, method):
    path = write_config(
        assets, name, method, {"caption_template": None}, epochs=1, eval_before_training=True
    )
    csvs = [f"data.train={assets['csv']}", f"data.eval={assets['eval_csv']}"]
    assert main(["train", str(path), *csvs]) == 0
    run = assets["root"] / "runs" / name
    out = summary(assets, name)
    assert out["status"] == "completed" and np.isfinite(out["eval"]["eval_loss"])
    # the adapter learnt: the held-out denoising loss (fixed noise per row) fell
    assert out["eval"]["eval_loss"] < out["before_training"]["eval_loss"]
    assert (run / "samples_after.png").is_file()
    diffusers_file = run / "adapter" / "pytorch_lora_weights.safetensors"
    assert diffusers_file.is_file() == (name != "adalora")
    if name == "text_encoder":
        from safetensors import safe_open

        with safe_open(str(diffusers_file), "pt") as f:
            keys = list(f.keys())
        assert any(k.startswith("text_encoder.encoder.layer.0") for k in keys)
        assert any(k.startswith("unet.down_blocks") for k in keys)


def test_ctrl_c_then_resume_matches_uninterrupted(assets, monkeypatch):
    """Noise and timesteps come from torch's generator, which a checkpoint restores."""
    import signal

    import peftkit.train.run as run_module

    full = write_config(assets, "full", LORA)
    assert main(["train", str(full)]) == 0
    real_trainer = run_module.Trainer

    def trainer_with_ctrl_c(*args, **kwargs):
        def on_step(progress):
            if progress.global_step == 2:
                signal.raise_signal(signal.SIGINT)

        return real_trainer(*args, **{**kwargs, "on_step": on_step})

    cut = write_config(assets, "cut", LORA)
    monkeypatch.setattr(run_module, "Trainer", trainer_with_ctrl_c)
    assert main(["train", str(cut)]) == 130
    monkeypatch.setattr(run_module, "Trainer", real_trainer)
    assert main(["train", str(cut), "--resume"]) == 0

    def losses(name):
        lines = (assets["root"] / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r.get("kind") == "train"]

    a, b = losses("full"), losses("cut")
    assert len(a) == 6 and a == b  # 12 images / batch 4 x 2 epochs
    assert (
        summary(assets, "full")["eval"]["eval_loss"] == summary(assets, "cut")["eval"]["eval_loss"]
    )


# --- refusals and bad inputs -------------------------------------------------------------------
def test_prompt_methods_refused(assets, capsys):
    path = write_config(assets, "prompt", {"type": "prefix_tuning", "num_virtual_tokens": 4})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    why, _, choices = err.partition("Use one of ")
    assert "prefix_tuning" in why and "use_dora" in choices
    assert {"lora", "adalora"} <= set(choices.replace(",", " ").split())
    assert "qlora" not in choices and "tuning" not in choices  # no 4-bit UNet, no prompts


def test_bad_inputs_named(assets, capsys):
    path = write_config(assets, "bad", LORA)
    bad = write_folder(assets["root"] / "bad", per_class=2, seed=3)
    (bad / "1" / "broken.png").write_bytes(b"not a png")
    assert main(["train", str(path), f"data.train={bad}"]) == 1
    assert "broken.png: not a readable image" in capsys.readouterr().err

    rgb = write_folder(assets["root"] / "rgb", per_class=2, seed=4)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(rgb / "2" / "colour.png")
    assert main(["train", str(path), f"data.train={rgb}", "--overwrite"]) == 1
    assert "colour.png: image has 3 channel(s) but the model reads 1" in capsys.readouterr().err

    table = assets["root"] / "no_captions.csv"
    table.write_text(f"image,text\n{assets['train'] / '1' / '0.png'},a handwritten 1\n")
    path = write_config(assets, "bad", LORA, {"caption_template": None})
    assert main(["train", str(path), f"data.train={table}", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "column(s) ['caption']" in err and "data.train" in err
    assert "no_captions.csv" in err  # the file the rows came from


def test_base_folder_errors(assets, tmp_path):
    from peftkit.diffusion import load_text_to_image

    with pytest.raises(FileNotFoundError, match="not a text-to-image base folder"):
        load_text_to_image(tmp_path)
    tiny_unet().save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "scheduler")
    with pytest.raises(FileNotFoundError, match="no text encoder"):
        load_text_to_image(tmp_path)
