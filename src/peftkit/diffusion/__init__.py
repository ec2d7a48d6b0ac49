"""Text-to-image diffusion: the model, sampling, diffusers' LoRA files, the judging classifier.

* :mod:`.model`: :class:`TextToImageUNet` (a diffusers UNet2DConditionModel + its noise
  scheduler + a frozen text encoder; the denoising loss) and :func:`load_text_to_image`.
* :mod:`.sampling`: DDIM/DDPM sampling (classifier-free guidance optional), PNGs and grids.
* :mod:`.diffusers_lora`: ``pytorch_lora_weights.safetensors`` written and read (``unet.`` keys).
* :mod:`.judge`: a small CNN that says which class a generated image shows.
"""

from .diffusers_lora import (
    DIFFUSERS_WEIGHTS,
    load_diffusers_lora,
    read_diffusers_lora,
    save_diffusers_lora,
)
from .judge import ImageJudge, load_judge
from .model import TextToImageUNet, load_text_to_image, save_text_to_image
from .sampling import grid, sample_images, save_png, write_images

__all__ = [
    "DIFFUSERS_WEIGHTS",
    "ImageJudge",
    "TextToImageUNet",
    "grid",
    "load_diffusers_lora",
    "load_judge",
    "load_text_to_image",
    "read_diffusers_lora",
    "sample_images",
    "save_png",
    "save_diffusers_lora",
    "save_text_to_image",
    "write_images",
]
