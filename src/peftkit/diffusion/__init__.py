"""Text-to-image diffusion: base folders, the model, latents, sampling, diffusers' LoRA files.

* :mod:`.folders`: Stable Diffusion pipeline folders (latent space: VAE, CLIP) and peftkit's
  pixel-space layout, read into one model (:func:`load_text_to_image`); errors name the fix.
* :mod:`.model`: :class:`TextToImageUNet` (a diffusers UNet2DConditionModel + its noise
  scheduler + a frozen text encoder (+ VAE); the denoising loss, diffusers' formulation).
* :mod:`.latents`: images <-> the VAE's scaled latents.
* :mod:`.sampling`: the pipeline's sampling loop (guidance, negative prompts, the folder's
  scheduler), PNGs and grids.
* :mod:`.diffusers_lora`: ``pytorch_lora_weights.safetensors`` written and read (``unet.`` /
  ``text_encoder.`` keys).
* :mod:`.judge`: a small CNN that says which class a generated image shows.
"""

from .diffusers_lora import (
    DIFFUSERS_WEIGHTS,
    load_diffusers_lora,
    read_diffusers_lora,
    save_diffusers_lora,
)
from .folders import (
    FolderError,
    folder_layout,
    is_text_to_image_folder,
    load_text_to_image,
    save_text_to_image,
)
from .judge import ImageJudge, load_judge
from .model import TextToImageUNet
from .sampling import SamplingOptions, grid, sample_images, save_png, write_images

__all__ = [
    "DIFFUSERS_WEIGHTS",
    "FolderError",
    "ImageJudge",
    "SamplingOptions",
    "TextToImageUNet",
    "folder_layout",
    "grid",
    "is_text_to_image_folder",
    "load_diffusers_lora",
    "load_judge",
    "load_text_to_image",
    "read_diffusers_lora",
    "sample_images",
    "save_png",
    "save_diffusers_lora",
    "save_png",
    "save_text_to_image",
    "write_images",
]
