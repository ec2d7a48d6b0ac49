"""text_to_image on a Stable Diffusion pipeline folder (a tiny random one built here: VAE with
4 latent channels, CLIP text encoder + byte-level CLIP tokenizer, PNDM scheduler).

* formulation parity: on a fixed batch peftkit's loss and LoRA gradients equal those of
  diffusers' train_text_to_image_lora.py / train_dreambooth_lora.py computed here from the same
  components (epsilon / v-prediction, min-SNR, text-encoder LoRA, prior preservation);
* cached latents train exactly as encoding every step;
* files both ways: the run's diffusers file in StableDiffusionPipeline.load_lora_weights (same
  noise), a LoRA diffusers saved (UNet + text encoder) in ``peftkit generate BASE --lora``;
* generate like diffusers: the pipeline's images with the LoRA loaded (max diff <= 1/255);
* DreamBooth end to end (class images sampled from the base), bad inputs named.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from peftkit.cli import main
from tiny_models import tiny_sd_pipeline
from tiny_runs import base_config

diffusers = pytest.importorskip("diffusers")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
SHAPES = ("circle", "bar")


def shape_image(kind: str, rng: np.random.Generator, size=(20, 16)) -> np.ndarray:
    """RGB (H, W) = size: a red disc or a blue bar on noise (not square: resize + crop run)."""
    h, w = size
    a = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    if kind == "circle":
        a[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2] = (230, 30, 30)
    else:
        a[h // 2 - 2 : h // 2 + 2, 2:-2] = (30, 30, 230)
    return a


def write_images(root: Path, per_class: int, seed: int, flat: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    for kind in SHAPES[:1] if flat else SHAPES:
        folder = root if flat else root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(shape_image(kind, rng)).save(folder / f"{kind}_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    tiny_sd_pipeline(root / "base")
    tiny_sd_pipeline(root / "base_v", prediction_type="v_prediction")
    return {"root": root, "base": root / "base", "base_v": root / "base_v",
            "train": write_images(root / "train", 4, 0),
            "eval": write_images(root / "eval", 1, 1)}  # fmt: skip


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def randomise(model, seed: int = 5, scale: float = 0.2) -> None:
    """Non-zero LoRA factors (B starts at 0: an untrained adapter changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def lora_params(model, strip: str = "") -> dict[str, torch.nn.Parameter]:
    return {n[len(strip) :] if n.startswith(strip) else n: p
            for n, p in model.named_parameters() if "lora_" in n}  # fmt: skip


# --- the model and its task on a Stable Diffusion folder ---------------------------------------
def ours(base: Path, targets: list[str], task: dict | None = None):
    """(PeftModel with random LoRA factors, the task built on it) from a pipeline folder."""
    import peftkit
    from peftkit.diffusion import load_text_to_image
    from peftkit.tasks import task_spec

    model, tok = load_text_to_image(base)
    peft_model = peftkit.get_peft_model(
        model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    )
    randomise(peft_model)
    spec = task_spec({"type": "text_to_image", "caption_template": "a {label}", **(task or {})})
    return peft_model, spec.build(tok, peft_model)


def reference_components(base: Path, ours_model, text_lora: bool):
    """What diffusers' LoRA scripts build: the folder's parts, peft LoRA on the UNet (and the
    text encoder), the DDPM noise scheduler; the LoRA factors copied from ``ours_model``."""
    import peft
    import transformers as tf

    unet = diffusers.UNet2DConditionModel.from_pretrained(base / "unet")
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                     target_modules=UNET_TARGETS))  # fmt: skip
    text = tf.CLIPTextModel.from_pretrained(base / "text_encoder")
    if text_lora:  # the scripts' text_encoder.add_adapter (peft's injection; transformers 5
        # asks for peft >= 0.22 in add_adapter)
        peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                         target_modules=TEXT_TARGETS), text)  # fmt: skip
    mine = lora_params(ours_model, "base_model.model.")
    with torch.no_grad():
        for name, p in list(lora_params(unet).items()) + [
            ("text_encoder." + n, p) for n, p in lora_params(text).items()
        ]:
            p.copy_(mine[name])
    vae = diffusers.AutoencoderKL.from_pretrained(base / "vae")
    sched = diffusers.DDPMScheduler.from_pretrained(base / "scheduler")
    tok = tf.CLIPTokenizer.from_pretrained(base / "tokenizer")
    return unet, text, vae, sched, tok


def fixed_batch(task, rows, dreambooth_rows: int = 0):
    """A training batch from the task's collate with fixed randomness; its latent noise is
    what latent_dist.sample(generator=Generator().manual_seed(11)) draws."""
    task.model.train()
    torch.manual_seed(3)
    batch = task.collate(task.encode(rows))
    g = torch.Generator().manual_seed(11)
    batch["latent_noise"] = torch.randn(batch["latent_noise"].shape, generator=g)
    return batch


def script_loss(unet, text, vae, sched, tok, batch, captions, snr_gamma=None, prior_weight=None):
    """The scripts' training step on ``batch`` (their code paths, written out)."""
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    pixel_values = batch["pixel_values"]
    latents = vae.encode(pixel_values).latent_dist.sample(
        generator=torch.Generator().manual_seed(11)
    )
    latents = latents * vae.config.scaling_factor
    noise, timesteps = batch["noise"], batch["timesteps"]
    noisy = sched.add_noise(latents, noise, timesteps)
    ids = tok(captions, max_length=tok.model_max_length, padding="max_length", truncation=True,
              return_tensors="pt").input_ids  # fmt: skip
    states = text(ids, return_dict=False)[0]
    if sched.config.prediction_type == "epsilon":
        target = noise
    else:
        target = sched.get_velocity(latents, noise, timesteps)
    pred = unet(noisy, timesteps, states, return_dict=False)[0]
    if prior_weight is not None:  # train_dreambooth_lora.py
        pred, pred_prior = torch.chunk(pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        prior = F.mse_loss(pred_prior.float(), target_prior.float(), reduction="mean")
        return loss + prior_weight * prior
    if snr_gamma is None:  # train_text_to_image_lora.py
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    snr = compute_snr(sched, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    weights = weights / snr if sched.config.prediction_type == "epsilon" else weights / (snr + 1)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()


def rows_of(folder: Path) -> list[dict]:
    from peftkit.data import read_records

    return read_records(folder)


@pytest.mark.parametrize(
    "base,snr_gamma,text_lora",
    [("base", None, False), ("base_v", None, False), ("base", 5.0, False), ("base_v", 5.0, True)],
)
def test_loss_and_gradients_equal_the_text_to_image_script(sd, base, snr_gamma, text_lora):
    targets = UNET_TARGETS + (TEXT_TARGETS if text_lora else [])
    model, task = ours(sd[base], targets, {"resolution": 16, "random_flip": True,
                                            "snr_gamma": snr_gamma})  # fmt: skip
    rows = rows_of(sd["train"])[:4]
    batch = fixed_batch(task, rows)
    loss = model(**batch).loss
    loss.backward()
    unet, text, vae, sched, tok = reference_components(sd[base], model, text_lora)
    captions = [task.options.caption_of(r) for r in rows]
    ref = script_loss(unet, text, vae, sched, tok, batch, captions, snr_gamma)
    ref.backward()
    assert rel_err(loss.detach(), ref.detach()) <= 1e-5
    mine = {n: p.grad for n, p in lora_params(model, "base_model.model.").items()}
    theirs = {n: p.grad for n, p in lora_params(unet).items()}
    theirs |= {"text_encoder." + n: p.grad for n, p in lora_params(text).items()}
    assert set(mine) == set(theirs) and len(mine) >= 8
    nonzero = [n for n in mine if theirs[n].norm() > 0]
    assert len(nonzero) >= len(mine) // 2  # the B factors are random: A gets gradients too
    for name in nonzero:
        assert rel_err(mine[name], theirs[name]) <= 1e-5, name


def test_loss_and_gradients_equal_the_dreambooth_script(sd, tmp_path):
    instance = write_images(tmp_path / "instance", 3, 2, flat=True)
    classes = write_images(tmp_path / "class", 2, 3, flat=True)
    model, task = ours(sd["base"], UNET_TARGETS + TEXT_TARGETS, {
        "resolution": 16, "center_crop": True, "instance_prompt": "a photo of sks disc",
        "class_data": str(classes), "class_prompt": "a photo of disc",
        "prior_loss_weight": 0.5})  # fmt: skip
    rows = rows_of(instance)
    assert [set(r) for r in rows] == [{"image"}] * 3  # a plain folder of images
    batch = fixed_batch(task, rows)
    assert batch["timesteps"].shape == (6,)  # 3 instance rows, then their 3 class rows
    loss = model(**batch).loss
    loss.backward()
    unet, text, vae, sched, tok = reference_components(sd["base"], model, True)
    captions = ["a photo of sks disc"] * 3 + ["a photo of disc"] * 3
    ref = script_loss(unet, text, vae, sched, tok, batch, captions, prior_weight=0.5)
    ref.backward()
    assert rel_err(loss.detach(), ref.detach()) <= 1e-5
    theirs = lora_params(unet) | {"text_encoder." + n: p for n, p in lora_params(text).items()}
    for name, p in lora_params(model, "base_model.model.").items():
        if theirs[name].grad.norm() > 0:
            assert rel_err(p.grad, theirs[name].grad) <= 1e-5, name


@pytest.mark.parametrize("flip", [False, True])
def test_cached_latents_train_as_encoding_every_step(sd, flip):
    """Same rows, same draws: the cached (mean, std) give the loss the VAE gives each step."""
    options = {"resolution": 16, "center_crop": True, "random_flip": flip}
    model, plain = ours(sd["base"], UNET_TARGETS, options)
    _, cached = ours(sd["base"], UNET_TARGETS, {**options, "cache_latents": True})
    cached.model = model
    rows = rows_of(sd["train"])
    features = cached.encode(rows)
    assert "image" not in features[0] and features[0]["latent_mean"].shape == (4, 8, 8)
    assert ("flip_mean" in features[0]) == flip
    model.train()
    for task, feats in ((plain, plain.encode(rows)), (cached, features)):
        torch.manual_seed(4)
        task.loss = model(**task.collate(feats)).loss
    torch.testing.assert_close(cached.loss, plain.loss, rtol=1e-5, atol=0)


# --- files both ways and generation --------------------------------------------------------------
def write_config(
    sd, name: str, method: dict, task: dict | None = None, data: dict | None = None, **top
) -> Path:
    task = {"type": "text_to_image", "caption_template": "a {label}", "resolution": 16,
            "samples_per_prompt": 1, "sample_steps": 2, "grid_scale": 1, **(task or {})}  # fmt: skip
    config = base_config(sd["base"], sd["root"] / "runs" / name, task,
                         data or {"train": str(sd["train"]), "eval": str(sd["eval"])}, method,
                         **{"epochs": 1, "batch_size": 4, "lr": 5e-2, "plots": False,
                            **top})  # fmt: skip
    path = sd["root"] / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def run(sd):
    """A short LoRA run on the UNet and the text encoder (random crops and flips, cached off)."""
    method = {"type": "lora", "r": 4, "lora_alpha": 8,
              "target_modules": UNET_TARGETS + TEXT_TARGETS}  # fmt: skip
    path = write_config(sd, "lora", method, {"random_flip": True}, epochs=2)
    assert main(["train", str(path)]) == 0
    return sd["root"] / "runs" / "lora"


def pipeline(base: Path):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise_of(unet, text, tok, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ids = tok(["a circle", "a bar"], padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        return unet(x, torch.tensor([10, 70]), text(ids)[0]).sample


def test_run_files_load_in_diffusers_and_predict_the_same_noise(sd, run):
    from safetensors import safe_open

    from peftkit.train.inference import find_target, load_for_inference, run_config, spec_for

    out = json.loads((run / "summary.json").read_text())
    assert out["status"] == "completed" and np.isfinite(out["eval"]["eval_loss"])
    log = (run / "train.log").read_text()
    assert "latents 4x8x8" in log and "16x16, 3 channel(s)" in log
    with safe_open(str(run / "adapter" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("text_encoder.encoder.layers.0.self_attn.q_proj.lora_A") for k in keys)
    assert any(k.startswith("unet.down_blocks.0.attentions.0") for k in keys)
    pipe = pipeline(sd["base"])
    before = noise_of(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    pipe.load_lora_weights(run / "adapter")
    target = find_target(run)
    config = run_config(target)
    loaded = load_for_inference(target, config, spec_for(config))
    mine = loaded.model.get_base_model()
    expected = noise_of(loaded.model, mine.text_encoder, mine.tokenizer)
    got = noise_of(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(got, before) > 1e-4  # the LoRA does act (UNet and text encoder)


def generated(folder: Path) -> np.ndarray:
    files = sorted(p for p in folder.iterdir() if p.name != "grid.png")
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files]).astype(int)


@pytest.mark.parametrize("sampler", [None, "euler_a"])
def test_generate_equals_the_pipeline_with_the_lora(sd, run, tmp_path, sampler):
    """PNDM (the folder's scheduler) and Euler ancestral (noise drawn from the generators)."""
    argv = ["generate", str(run), "--prompt", "a circle", "--negative-prompt", "a bar",
            "--guidance-scale", "3.0", "--steps", "4", "--seed", "5", "--num-images", "2",
            "--output", str(tmp_path)]  # fmt: skip
    assert main(argv + (["--sampler", sampler] if sampler else [])) == 0
    mine = generated(tmp_path)
    assert mine.shape == (2, 16, 16, 3) and (tmp_path / "grid.png").is_file()
    pipe = pipeline(sd["base"])
    if sampler:
        pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(
            pipe.scheduler.config
        )
    pipe.load_lora_weights(run / "adapter")
    theirs = pipe("a circle", negative_prompt="a bar", guidance_scale=3.0, num_inference_steps=4,
                  num_images_per_prompt=2, output_type="np",
                  generator=[torch.Generator().manual_seed(s) for s in (5, 6)]).images  # fmt: skip
    theirs = (theirs * 255).round().astype(int)
    assert np.abs(mine - theirs).max() <= 1  # <= 1/255
    assert np.abs(mine[0] - mine[1]).max() > 10  # two seeds, two images


def test_diffusers_saved_lora_generates_from_the_base_folder(sd, tmp_path):
    """save_lora_weights (UNet r=4 alpha 8, text encoder r=2 alpha 2) -> peftkit generate BASE
    --lora FILE: the pipeline's images with that LoRA loaded."""
    import peft
    from peft.utils import get_peft_model_state_dict

    pipe = pipeline(sd["base"])
    unet_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS)
    text_cfg = peft.LoraConfig(r=2, lora_alpha=2, target_modules=TEXT_TARGETS)
    pipe.unet.add_adapter(unet_cfg)
    peft.inject_adapter_in_model(text_cfg, pipe.text_encoder)
    randomise(pipe.unet, 1, 0.3)
    randomise(pipe.text_encoder, 2, 0.3)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_cfg.to_dict(),
        text_encoder_lora_adapter_metadata=text_cfg.to_dict(),
    )  # fmt: skip
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    assert main(["generate", str(sd["base"]), "--lora", str(lora), "--prompt", "a circle",
                 "--guidance-scale", "2", "--steps", "3", "--seed", "0", "--num-images", "1",
                 "--output", str(tmp_path / "out")]) == 0  # fmt: skip
    fresh = pipeline(sd["base"])
    fresh.load_lora_weights(lora)
    theirs = fresh("a circle", guidance_scale=2.0, num_inference_steps=3, output_type="np",
                   generator=[torch.Generator().manual_seed(0)]).images  # fmt: skip
    plain = pipeline(sd["base"])("a circle", guidance_scale=2.0, num_inference_steps=3,
                                  output_type="np",
                                  generator=[torch.Generator().manual_seed(0)]).images  # fmt: skip
    mine = generated(tmp_path / "out")
    assert np.abs(mine - (theirs * 255).round()).max() <= 1
    assert np.abs(mine - (plain * 255).round()).max() > 1  # the LoRA changes the image


def test_generate_from_a_base_folder_refuses_run_overrides(sd, tmp_path, capsys):
    """KEY=VALUE overrides change a run's config; a base folder has none: refused by name, with
    the options it takes, before any model is loaded or image written."""
    out = tmp_path / "out"
    assert main(["generate", str(sd["base"]), "task.decode=rank", "--prompt", "a circle",
                 "--output", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "overrides (task.decode=rank) are for run folders" in err
    assert "--steps / --guidance-scale" in err
    assert not out.exists()


# --- DreamBooth and latent caching end to end ----------------------------------------------------
def test_dreambooth_run_samples_class_images_then_trains(sd, tmp_path):
    instance = write_images(tmp_path / "sks", 2, 5, flat=True)
    classes = tmp_path / "class_images"
    task = {"caption_template": None, "instance_prompt": "a photo of sks disc",
            "class_data": str(classes), "class_prompt": "a photo of disc",
            "num_class_images": 3, "center_crop": True, "cache_latents": True}  # fmt: skip
    path = write_config(sd, "dreambooth", {"type": "lora", "r": 4, "target_modules": UNET_TARGETS},
                        task, data={"train": str(instance)})  # fmt: skip
    assert main(["train", str(path)]) == 0
    assert sorted(p.name for p in classes.iterdir()) == [
        "class_00000.png", "class_00001.png", "class_00002.png"]  # fmt: skip
    log = (sd["root"] / "runs" / "dreambooth" / "train.log").read_text()
    assert "DreamBooth: 3 pairs of 2 instance and 3 class image(s)" in log
    assert f"3 class image(s) sampled from the base model into {classes} first" in log
    assert "(cached)" in log
    out = json.loads((sd["root"] / "runs" / "dreambooth" / "summary.json").read_text())
    assert out["status"] == "completed"


# --- bad input ---------------------------------------------------------------------------------
def test_bad_folders_named(sd, tmp_path):
    import shutil

    from peftkit.diffusion import FolderError, load_text_to_image

    with pytest.raises(FolderError, match="not a text-to-image base folder.*model_index.json"):
        load_text_to_image(sd["train"])
    for part, fix in (("vae", "VAE's latents"), ("tokenizer", "tokenizer it was trained with")):
        broken = tmp_path / f"no_{part}"
        shutil.copytree(sd["base"], broken)
        shutil.rmtree(broken / part)
        with pytest.raises(FolderError, match=rf"no_{part}/{part}: missing.*{fix}.*copy {part}/"):
            load_text_to_image(broken)
    xl = tmp_path / "xl"
    shutil.copytree(sd["base"], xl)
    shutil.copytree(xl / "text_encoder", xl / "text_encoder_2")
    with pytest.raises(FolderError, match="Stable Diffusion XL.*pooled text embeddings"):
        load_text_to_image(xl)


def test_bad_inputs_named(sd, capsys):
    path = write_config(sd, "bad", {"type": "lora", "target_modules": UNET_TARGETS})
    assert main(["train", str(path), "task.resolution=15"]) == 1
    err = capsys.readouterr().err
    assert "task.resolution 15 is not a multiple of the VAE's downsampling factor 2" in err
    assert "use 14 or 16" in err
    assert main(["train", str(path), "task.cache_latents=true", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "bar_000.png: 16x20 after resizing needs a crop to 16x16" in err
    assert "task.center_crop: true" in err
    grey = sd["root"] / "grey" / "circle"
    grey.mkdir(parents=True)
    Image.new("RGBA", (16, 16)).save(grey / "ok.png")
    Image.fromarray(np.zeros((16, 16, 2), np.uint8)[..., 0]).save(grey / "fine.png")
    Image.new("CMYK", (16, 16)).save(grey / "cmyk.tiff")
    # RGBA drops alpha, grey repeats into RGB, CMYK converts: the VAE reads 3 channels of each
    assert main(["train", str(path), f"data.train={grey.parent}", "--overwrite"]) == 0
    tiny_sd_pipeline(sd["root"] / "base_grey", image_channels=1)
    assert main(["train", str(path), f"model.name={sd['root'] / 'base_grey'}", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "bar_000.png: image has 3 channel(s) but the VAE reads 1 (vae/config.json" in err
