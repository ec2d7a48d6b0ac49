"""`task.type: image_cls` end to end on tiny models and generated image folders: every method
that applies (LoRA, DoRA, AdaLoRA, QLoRA) through the CLI on a ViT, a ConvNeXt (depthwise convs)
and a plain PyTorch EfficientNet-Lite; resume, eval, generate --image, the confusion matrix;
prompt methods refused; bad images named; LoRA on the image models equal to PEFT's."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

from conftest import require, shared_data
from peftkit.cli import main
from tiny_models import tiny_model
from tiny_runs import base_config

require("efficientnet_pytorch")

COLOURS = {"red": (200, 40, 40), "green": (40, 190, 60), "blue": (50, 60, 210)}


def write_folder(root: Path, per_class: int, seed: int) -> Path:
    """``root/<colour>/<i>.png``: 16x16 noisy images whose main colour is the class."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(rgb, 40, size=(16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def save_vit(folder: Path, **sizes) -> Path:
    tiny_model("vit", "IMAGE_CLS", **sizes).save_pretrained(folder)
    getattr(tf, "ViTImageProcessorPil", tf.ViTImageProcessor)(
        size={"height": 16, "width": 16}
    ).save_pretrained(folder)
    return folder


def save_convnext(folder: Path) -> Path:
    tiny_model("convnext", "IMAGE_CLS").save_pretrained(folder)
    getattr(tf, "ConvNextImageProcessorPil", tf.ConvNextImageProcessor)(
        size={"shortest_edge": 16}, crop_pct=0.875
    ).save_pretrained(folder)
    return folder


def save_lite(folder: Path) -> Path:
    """A random EfficientNet-Lite at a quarter of Lite0's width and depth, saved as a plain
    vision folder (config.json naming the architecture + model.safetensors)."""
    from peftkit.vision.models import ARCH_KEY, LITE_PREPROCESSING, build_efficientnet_lite

    torch.manual_seed(0)
    arch = {ARCH_KEY: "efficientnet_lite", "width_coefficient": 0.25, "depth_coefficient": 0.25,
            "dropout_rate": 0.0, "drop_connect_rate": 0.0, "num_labels": 1000}  # fmt: skip
    model = build_efficientnet_lite(arch).train()
    for module in model.modules():  # BatchNorm statistics of random data, as if pretrained
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the passes
    with torch.no_grad():
        for _ in range(4):
            model(pixel_values=torch.randn(16, 3, 16, 16))
    model.eval().save_pretrained(folder)
    import dataclasses

    dataclasses.replace(LITE_PREPROCESSING, size=(16, 16)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_cls")
    return {
        "root": root,
        "vit": save_vit(root / "vit"),
        "vit64": save_vit(root / "vit64", hidden=64, ffn=128),  # NF4's 64-weight blocks fit
        "convnext": save_convnext(root / "convnext"),
        "lite": save_lite(root / "lite"),
        "train": write_folder(root / "train", per_class=8, seed=0),
        "eval": write_folder(root / "eval", per_class=3, seed=1),
    }


VIT_LORA = {"type": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
METHODS = {
    # name: (model, method block)
    "vit_lora": ("vit", VIT_LORA),
    "vit_dora": ("vit", {**VIT_LORA, "use_dora": True}),
    "vit_adalora": ("vit", {"type": "adalora", "init_r": 6, "target_r": 2, "tinit": 1,
                            "tfinal": 1, "deltaT": 1, "target_modules": ["q_proj", "v_proj"]}),
    "vit_qlora": ("vit64", {**VIT_LORA, "type": "qlora"}),
    # depthwise 7x7 convs (groups = channels: r divisible by them) and the pointwise Linear
    "convnext_lora": ("convnext", {"type": "lora", "r": 32, "lora_alpha": 32,
                                   "target_modules": ["dwconv", "pwconv1"]}),
    # a plain PyTorch network: LoRA on its 1x1 convolutions, head `_fc` saved with the adapter
    "lite_lora": ("lite", {"type": "lora", "r": 4, "lora_alpha": 8,
                           "target_modules": r".*\._(expand|project)_conv"}),
}  # fmt: skip


def write_config(assets, name: str, model: str, method: dict, **top) -> Path:
    config = base_config(
        assets[model],
        assets["root"] / "runs" / name,
        {"type": "image_cls"},
        {"train": str(assets["train"]), "eval": str(assets["eval"])},
        method,
        **{"epochs": 2, "lr": 3e-2, **top},
    )
    path = assets["root"] / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return path


def summary(assets, name: str) -> dict:
    return json.loads((assets["root"] / "runs" / name / "summary.json").read_text())


@pytest.mark.parametrize("name", list(METHODS))
def test_train_each_method(assets, name):
    model, method = METHODS[name]
    assert main(["train", str(write_config(assets, name, model, method))]) == 0
    out = summary(assets, name)
    run = assets["root"] / "runs" / name
    assert out["status"] == "completed" and out["eval"]["accuracy"] >= 0.0
    assert set(out["baselines"]) >= {"majority_accuracy", "majority_macro_f1"}
    assert {f"class_acc/{c}" for c in COLOURS} <= set(out["eval"])
    assert (run / "confusion_matrix.png").stat().st_size > 1000
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == (["_fc"] if model == "lite" else ["classifier"])
    with open(run / "predictions_eval.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 9 and {r["prediction"] for r in rows} <= set(COLOURS)


def test_lora_learns_colours(assets):
    """The plain network (random weights) with LoRA + head learns colour classes."""
    path = write_config(assets, "lite_learns", "lite", METHODS["lite_lora"][1], epochs=6)
    assert main(["train", str(path)]) == 0
    out = summary(assets, "lite_learns")
    assert out["eval"]["accuracy"] > out["baselines"]["majority_accuracy"]


def test_ctrl_c_then_resume_matches_uninterrupted(assets, monkeypatch):
    """Augmentation draws from torch's generator, which a checkpoint restores: the resumed
    loss curve equals the uninterrupted one."""
    import signal

    import peftkit.train.run as run_module

    method = METHODS["lite_lora"][1]
    full = write_config(assets, "lite_full", "lite", method, plots=False)
    assert main(["train", str(full)]) == 0
    real_trainer = run_module.Trainer

    def trainer_with_ctrl_c(*args, **kwargs):
        def on_step(progress):
            if progress.global_step == 4:
                signal.raise_signal(signal.SIGINT)

        return real_trainer(*args, **{**kwargs, "on_step": on_step})

    cut = write_config(assets, "lite_cut", "lite", method, plots=False)
    monkeypatch.setattr(run_module, "Trainer", trainer_with_ctrl_c)
    assert main(["train", str(cut)]) == 130
    monkeypatch.setattr(run_module, "Trainer", real_trainer)
    assert main(["train", str(cut), "--resume"]) == 0

    def losses(name):
        lines = (assets["root"] / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r.get("kind") == "train"]

    a, b = losses("lite_full"), losses("lite_cut")
    assert len(a) == 6 and a == b  # 24 images / batch 8 x 2 epochs


def test_eval_and_generate_image(assets, capsys):
    run = assets["root"] / "runs" / "vit_lora"
    if not (run / "adapter").exists():
        assert main(["train", str(write_config(assets, "vit_lora", *METHODS["vit_lora"]))]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rows"] == 9 and "accuracy" in result and "majority_accuracy" in result
    images = [str(assets["eval"] / c / "0.png") for c in COLOURS]
    assert main(["generate", str(run), "--image", *images]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 3 and set(printed) <= set(COLOURS)


def test_prompt_methods_refused(assets, capsys):
    path = write_config(assets, "vit_prompt", "vit", {"type": "prompt_tuning",
                                                      "num_virtual_tokens": 4})  # fmt: skip
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    why, _, choices = err.partition("Use one of ")
    assert "prompt_tuning" in why and "virtual tokens" in why and "use_dora" in choices
    assert {"lora", "qlora", "adalora"} <= set(choices.replace(",", " ").split())
    assert "tuning" not in choices


def test_bad_inputs_named(assets, capsys):
    bad = write_folder(assets["root"] / "bad", per_class=2, seed=3)
    (bad / "red" / "broken.png").write_bytes(b"not a png")
    path = write_config(assets, "vit_bad", "vit", VIT_LORA)
    assert main(["train", str(path), f"data.train={bad}"]) == 1
    assert "broken.png: not a readable image" in capsys.readouterr().err

    table = assets["root"] / "paths.csv"
    table.write_text("file,label\nred/0.png,red\n")
    assert main(["train", str(path), f"data.train={table}"]) == 2
    assert "column(s) ['image']" in capsys.readouterr().err

    from peftkit.vision import ImageReadError, read_image

    with pytest.raises(ImageReadError, match="x.npy.*5 channel"):
        read_image_array = np.zeros((4, 4, 5), np.uint8)
        try:
            read_image(read_image_array)
        except ImageReadError as exc:
            raise ImageReadError("x.npy", str(exc).split(": ", 1)[1]) from None
    with pytest.raises(ImageReadError, match=r"0\.png: image has 3 channel\(s\) but the model"):
        read_image(assets["train"] / "red" / "0.png", channels=1)
    assert read_image(np.zeros((4, 4), np.uint8)).shape == (4, 4, 3)  # grey -> RGB


def test_csv_of_paths_and_idx_rows(assets):
    """(path, label) tables with paths relative to task.image_root; MNIST idx rows (arrays)."""
    from peftkit.data import read_idx, read_records
    from peftkit.tasks import task_spec

    table = assets["root"] / "images.csv"
    table.write_text("path,label\n" + "".join(f"{c}/0.png,{c}\n" for c in COLOURS))
    rows = read_records(table)
    spec = task_spec({"type": "image_cls", "image": "path", "image_root": str(assets["train"])})
    spec = spec.fit(rows)
    model, processor = (
        tiny_model("vit", "IMAGE_CLS"),
        getattr(tf, "ViTImageProcessorPil", tf.ViTImageProcessor)(size=16),
    )
    task = spec.build(processor, model)
    batch = task.collate(task.encode(rows))
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert batch["labels"].tolist() == [2, 1, 0]  # labels sorted: blue, green, red
    small = task_spec({"type": "image_cls", "image": "path", "image_root": str(assets["train"]),
                       "image_size": 8}).fit(rows).build(processor, model)  # fmt: skip
    assert small.collate(small.encode(rows))["pixel_values"].shape == (3, 3, 8, 8)

    idx = shared_data("image_mnist_test")
    digits = read_idx(idx / "t10k-images-idx3-ubyte.gz", idx / "t10k-labels-idx1-ubyte.gz")[:4]
    spec = task_spec({"type": "image_cls", "labels": [str(i) for i in range(10)]}).fit(digits)
    task = spec.build(processor, model)
    batch = task.collate(task.encode(digits))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)  # grey digits repeated into RGB
    assert batch["labels"].tolist() == [d["label"] for d in digits]


def test_preprocessing_matches_transformers(assets):
    """Our resize/normalise equals the model's own image processor (ViT and ConvNeXt)."""
    from peftkit.vision import ImagePreprocessing, read_image

    image = read_image(assets["train"] / "green" / "1.png")
    big = np.array(Image.fromarray(image).resize((40, 30)))
    for folder in (assets["vit"], assets["convnext"]):
        processor = tf.AutoImageProcessor.from_pretrained(folder)
        ours = ImagePreprocessing.from_processor(processor)(big)
        theirs = processor(images=Image.fromarray(big), return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=0)


@pytest.mark.parametrize("model", ["vit", "convnext", "lite"])
def test_saved_adapter_gives_peft_logits(assets, model):
    """peft loads the adapter peftkit trained (LoRA + head) onto the same base weights and
    returns the same logits."""
    import peft

    from peftkit import PeftModel
    from peftkit.models import load_base_model

    name = {"vit": "vit_lora", "convnext": "convnext_lora", "lite": "lite_lora"}[model]
    run = assets["root"] / "runs" / name
    if not (run / "adapter").exists():
        assert main(["train", str(write_config(assets, name, *METHODS[name]))]) == 0
    labels = json.loads((run / "task_state.json").read_text())["labels"]
    kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels))}
    pixels = torch.randn(2, 3, 16, 16)

    base, _ = load_base_model(assets[model], task="image_cls", **kwargs)
    ours = PeftModel.from_pretrained(base, run / "adapter").eval()
    base2, _ = load_base_model(assets[model], task="image_cls", **kwargs)
    theirs = peft.PeftModel.from_pretrained(base2, run / "adapter").eval()
    with torch.no_grad():
        a, b = ours(pixel_values=pixels).logits, theirs(pixel_values=pixels).logits
        plain = base2.get_base_model() if hasattr(base2, "get_base_model") else None
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    head = "_fc" if model == "lite" else "classifier"
    assert (
        head in json.loads((run / "adapter" / "adapter_config.json").read_text())["modules_to_save"]
    )
    del plain


def test_metrics_match_sklearn():
    from sklearn.metrics import confusion_matrix, recall_score

    from peftkit import metrics as M

    refs = ["a", "b", "c", "a", "b", "c", "a"]
    preds = ["a", "c", "c", "b", "b", "c", "a"]
    labels = ["a", "b", "c", "d"]
    assert (
        M.confusion_matrix(preds, refs, labels)
        == confusion_matrix(refs, preds, labels=labels).tolist()
    )
    per = M.per_class_accuracy(preds, refs, labels)
    want = recall_score(refs, preds, labels=labels[:3], average=None)
    assert [per[c] for c in labels[:3]] == pytest.approx(list(want))
    assert per["d"] is None


@pytest.mark.parametrize("model", ["vit", "lite"])
def test_merge_gives_the_adapter_logits(assets, model, capsys):
    """`peftkit merge` folds LoRA into the base (a transformers folder, or a plain vision folder
    with its preprocessor config); the merged model loads back and gives the adapter's logits."""
    from peftkit import PeftModel
    from peftkit.models import load_base_model

    name = f"{model}_lora"
    run = assets["root"] / "runs" / name
    if not (run / "adapter").exists():
        assert main(["train", str(write_config(assets, name, *METHODS[name]))]) == 0
    merged = assets["root"] / f"merged_{model}"
    assert main(["merge", str(run), "--output", str(merged)]) == 0
    labels = json.loads((run / "task_state.json").read_text())["labels"]
    kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels))}
    base, _ = load_base_model(assets[model], task="image_cls", **kwargs)
    adapted = PeftModel.from_pretrained(base, run / "adapter").eval()
    plain, processor = load_base_model(merged, task="image_cls")
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want, got = adapted(pixel_values=pixels).logits, plain(pixel_values=pixels).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert plain.config.id2label[0] == labels[0]
    assert (merged / "preprocessor_config.json").is_file()
