"""LoHa, LoKr and IA3 on a diffusers UNet (attention projections and the ResNet convolutions, CP
form included) equal to PEFT's, and diffusers' file for LoKr both ways (LoHa, IA3: refused,
named)."""

from __future__ import annotations

import peft
import pytest
import torch

import peftkit
from peftkit.cli import main
from peftkit.diffusion import load_diffusers_lora, save_diffusers_lora
from test_text_to_image import assets, noise_pred, rel_err, summary, tiny_unet  # noqa: F401
from test_text_to_image import write_config as write_t2i_config

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]  # conv1/2: the ResNets' 3x3
METHODS = {
    "LoHaConfig": {"r": 4, "alpha": 8, "use_effective_conv2d": True},
    "LoKrConfig": {"r": 2, "alpha": 4, "decompose_both": True, "use_effective_conv2d": True},
    "IA3Config": {"feedforward_modules": ["conv1", "to_out.0"]},  # input side there, output else
}
RANDOM = {"IA3Config": {"init_ia3_weights": False}}  # others: init_weights=False


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("cls", list(METHODS))
def test_unet_adapter_matches_peft_both_ways(tmp_path, cls):
    kwargs = {"target_modules": TARGETS, **RANDOM.get(cls, {"init_weights": False}), **METHODS[cls]}
    torch.manual_seed(1)
    theirs = peft.get_peft_model(tiny_unet(), getattr(peft, cls)(**kwargs))
    torch.manual_seed(1)
    ours = peftkit.get_peft_model(tiny_unet(), getattr(peftkit, cls)(**kwargs))
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # same seed, same adapter
    assert rel_err(noise_pred(ours), noise_pred(theirs)) <= 1e-5
    assert rel_err(noise_pred(ours), noise_pred(tiny_unet())) > 1e-3
    ours.save_pretrained(tmp_path)
    back = peft.PeftModel.from_pretrained(tiny_unet(), tmp_path)
    assert rel_err(noise_pred(back), noise_pred(ours)) <= 1e-5
    merged = ours.merge_and_unload()
    assert rel_err(noise_pred(merged), noise_pred(theirs)) <= 1e-5


@pytest.mark.filterwarnings("ignore")
def test_lokr_diffusers_file_both_ways(tmp_path):
    from diffusers import StableDiffusionPipeline

    kwargs = {"target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "init_weights": False}
    ours = peftkit.get_peft_model(tiny_unet(), peftkit.LoKrConfig(r=2, alpha=3, **kwargs))
    path = save_diffusers_lora(ours, tmp_path)
    # what pipeline.load_lora_weights does: lora_state_dict, then load_lora_into_unet
    state, alphas, meta = StableDiffusionPipeline.lora_state_dict(
        tmp_path, return_lora_metadata=True
    )
    assert any(".lokr_w1" in k for k in state) and meta["unet.alpha"] == 3
    unet = tiny_unet()
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, metadata=meta)
    assert rel_err(noise_pred(unet), noise_pred(ours)) <= 1e-5
    back = load_diffusers_lora(tiny_unet(), path)
    assert isinstance(back.active_peft_config, peftkit.LoKrConfig)
    assert rel_err(noise_pred(back), noise_pred(ours)) <= 1e-5


def test_loha_has_no_diffusers_file():
    model = peftkit.get_peft_model(tiny_unet(), peftkit.LoHaConfig(target_modules=["to_q"]))
    with pytest.raises(ValueError, match="diffusers has no reader for LoHa"):
        save_diffusers_lora(model, "unused")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("method", ["loha", "lokr", "ia3"])
def test_train_text_to_image(assets, method):  # noqa: F811 (the fixture)
    block = {"type": method, "r": 4, "alpha": 4, "target_modules": ["to_q", "to_k", "to_v"]}
    if method == "ia3":
        block = {"type": method, "target_modules": ["to_k", "to_v", "conv2"],
                 "feedforward_modules": ["conv2"]}  # fmt: skip
    path = write_t2i_config(assets, method, block, epochs=1)
    assert main(["train", str(path)]) == 0
    run = assets["root"] / "runs" / method
    out = summary(assets, method)
    assert out["status"] == "completed" and out["method"] == method
    diffusers_file = run / "adapter" / "pytorch_lora_weights.safetensors"
    assert diffusers_file.is_file() == (method == "lokr")
    log = (run / "train.log").read_text()
    if method == "loha":
        assert "no diffusers LoRA file: LOHA: diffusers has no reader for LoHa" in log
    if method == "ia3":
        assert "no diffusers LoRA file: IA3: diffusers' LoRA files hold LoRA / DoRA" in log
    theirs = peft.PeftModel.from_pretrained(
        tiny_unet(), run / "adapter"
    )  # the base folder's UNet is tiny_unet()
    mine = peftkit.PeftModel.from_pretrained(tiny_unet(), run / "adapter")
    assert rel_err(noise_pred(mine), noise_pred(theirs)) <= 1e-5
    assert rel_err(noise_pred(mine), noise_pred(tiny_unet())) > 1e-5  # it trained
