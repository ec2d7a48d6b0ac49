"""DreamBooth with prior preservation, as diffusers' train_dreambooth_lora.py trains it.

::

    data.train: the instance images (a plain folder of images works), every caption
                task.instance_prompt ("a photo of sks dog")
    task.class_data: class images (any folder of images), caption task.class_prompt
                ("a photo of dog"); fewer than task.num_class_images there: the rest are
                sampled from the base model (adapter off) with class_prompt and saved there
                first, as the script does: the prior is what the model draws before training
    examples: max(#instance, #class) pairs, pair i = (instance i mod #instance, class i mod #class)
    batch of B pairs -> 2B rows: B instance rows, then B class rows, each with its own ε and t
    loss = mean_instance + prior_loss_weight · mean_class   (row weights 1/B and w/B)

Without class data the run is plain fine-tuning on the instance images (no prior term).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.images import IMAGE_SUFFIXES

CLASS_IMAGE = "class_{:05d}.png"  # file name of the k-th sampled class image


def class_image_files(folder: str | Path) -> list[Path]:
    """The images under ``folder`` (sub-folders included), sorted: the same order everywhere."""
    root = Path(folder).expanduser()
    if not root.exists():
        return []
    suffixes = tuple(s.lower() for s in IMAGE_SUFFIXES)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def sample_missing_class_images(
    model: Any,
    folder: str | Path,
    prompt: str,
    wanted: int,
    seed: int,
    sample: Any,
) -> list[Path]:
    """Sample ``wanted`` − (images already in ``folder``) images of ``prompt`` with the base
    model and save them there (atomic PNGs); ``sample(prompts, seeds)`` draws images in [0, 1]
    (N, C, H, W). Returns the files written."""
    from ..diffusion.sampling import save_png, to_pil

    root = Path(folder).expanduser()
    have = len(class_image_files(root))
    missing = max(0, wanted - have)
    if not missing:
        return []
    root.mkdir(parents=True, exist_ok=True)
    seeds = [seed + have + k for k in range(missing)]
    disable = getattr(model, "disable_adapter", None)
    if disable is not None:  # the prior is the base model's, whatever is attached
        with disable():
            images = sample([prompt] * missing, seeds)
    else:
        images = sample([prompt] * missing, seeds)
    written = []
    for k, image in enumerate(images):
        written.append(save_png(to_pil(image), root / CLASS_IMAGE.format(have + k)))
    return written


def paired(
    instance: Sequence[dict[str, Any]], classes: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """DreamBooth's examples: max(#instance, #class) features, feature i holds instance
    i mod #instance and, under ``"prior"``, class i mod #class."""
    if not classes:
        return list(instance)
    n = max(len(instance), len(classes))
    return [{**instance[i % len(instance)], "prior": classes[i % len(classes)]} for i in range(n)]


__all__ = ["CLASS_IMAGE", "class_image_files", "paired", "sample_missing_class_images"]
