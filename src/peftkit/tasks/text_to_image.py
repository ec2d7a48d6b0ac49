"""Text-to-image: (image, caption) rows -> a LoRA that teaches a diffusion UNet a new concept.

::

    rows {image: path | array, caption}  (CSV/JSONL of paths + captions; an image folder or
         MNIST idx rows + task.caption_template, e.g. "a handwritten {label}")
      ──encode──> each image read once (uint8, the UNet's channel count; a bad file is an error
                  naming it), resized to the UNet's side; the caption tokenized
      ──collate──> pixel_values (B, C, S, S) in [-1, 1], prompt_ids / prompt_mask (B, T),
                   noise ε (B, C, S, S), timesteps (B,): random while the model trains (torch's
                   generator: resume repeats it), fixed per row at evaluation (seeded by the row)
      ──model──> DenoisingOutput.loss: MSE on ε / v / x0, as the scheduler's prediction_type says
    evaluation: the held-out denoising loss (deterministic) and, with task.classifier, images
      sampled per distinct (caption, label) of the eval rows, judged: ``recognised`` = the share
      shown as the prompted label (``recognised/<label>`` per label); predictions = those labels
    finish (write_run_files): adapter/pytorch_lora_weights.safetensors (diffusers' layout),
      samples_before.png (adapter disabled = the base model) and samples_after.png
    generate: --prompt ... --num-images N --seed S -> PNGs + grid.png

Only adapters that go into the UNet's (or text encoder's) layers apply: LoRA (DoRA with
``use_dora``) and AdaLoRA; prompt-learning methods are refused.
"""

from __future__ import annotations

import dataclasses
import string
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import EvalContext, EvalResult, Task, TaskOptions, TaskSpec

T2I_METHODS = ("lora", "adalora")  # DoRA: lora with use_dora: true
EVAL_SEED = 1234  # the noise and timesteps of eval row i come from seed EVAL_SEED + i


@dataclasses.dataclass
class TextToImageOptions(TaskOptions):
    """Attributes:
    image: the column holding an image path (or an array, as MNIST's idx rows do).
    caption: the caption column (rows from CSV/JSONL).
    caption_template: build the caption from other columns instead, e.g. ``"a handwritten
        {label}"`` for image folders (the label is the folder name).
    label: the column naming what each image shows, for the judge (default ``label``).
    image_root: folder that relative image paths start from (default: the working directory).
    classifier: a judge folder (:mod:`peftkit.diffusion.judge`): evaluation samples images and
        reports the share recognised as the prompted label.
    samples_per_prompt: images sampled per distinct eval caption (with ``classifier``) and per
        prompt in the sample grids.
    sample_prompts: the grids' prompts (default: the distinct eval captions, at most 10).
    sample_steps: DDIM steps when sampling.
    guidance_scale: classifier-free guidance (1: none; the base must have learnt "" prompts).
    sample_seed: seed of the first sampled image (image k: ``sample_seed + k``).
    grid_scale: sample grids are drawn this many times larger (small images).
    """

    image: str = "image"
    caption: str = "caption"
    caption_template: str | None = None
    label: str = "label"
    image_root: str | None = None
    classifier: str | None = None
    samples_per_prompt: int = 4
    sample_prompts: list[str] | None = None
    sample_steps: int = 25
    guidance_scale: float = 1.0
    sample_seed: int = 0
    grid_scale: int = 2

    def __post_init__(self) -> None:
        for name in ("samples_per_prompt", "sample_steps", "grid_scale"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if float(self.guidance_scale) < 1.0:
            raise ValueError(f"guidance_scale must be >= 1, got {self.guidance_scale}")

    def template_fields(self) -> list[str]:
        if self.caption_template is None:
            return []
        return [f for _, f, _, _ in string.Formatter().parse(self.caption_template) if f]

    def caption_of(self, row: Mapping[str, Any]) -> str:
        if self.caption_template is not None:
            return self.caption_template.format(**{f: row[f] for f in self.template_fields()})
        return str(row[self.caption])

    def input_columns(self) -> list[str]:
        return self.template_fields() or [self.caption]

    def target_columns(self) -> list[str]:
        return [self.image]

    def check_records(
        self,
        records: Sequence[dict],
        split: str,
        need_targets: bool,
        labels: Sequence[str] | None = None,
    ) -> list[str]:
        problems = super().check_records(records, split, need_targets, labels)
        if problems and self.caption_template is None and records and "label" in records[0]:
            problems[-1] += (
                "; the rows have labels but no captions: set task.caption_template, e.g. "
                "'a handwritten {label}'"
            )
        return problems

    def input_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """``generate --prompt "a handwritten 7"`` gives the caption itself."""
        if "text" in row:
            return {"caption": str(row["text"])}
        if self.caption in row or self.template_fields():
            return {"caption": self.caption_of(row)}
        raise ValueError(f"the model reads captions from column {self.caption!r}; give --prompt")

    def describe(self, row: Mapping[str, Any]) -> str:
        return str(row.get("caption", ""))


def refuse_method(method_type: str) -> None:
    """ValueError for adapter methods that cannot adapt a diffusion UNet."""
    if method_type not in T2I_METHODS:
        raise ValueError(
            f"method {method_type!r} does not apply to text_to_image: prompt tuning, P-tuning "
            "and prefix tuning add virtual tokens to a language model's embeddings or "
            f"attention cache. Use one of {', '.join(T2I_METHODS)} (DoRA: lora with "
            "use_dora: true) on the UNet's attention projections (to_q, to_k, to_v, to_out.0)"
        )


class TextToImage(Task):
    """``task.type: text_to_image``."""

    Options = TextToImageOptions
    generates = True  # evaluation samples images (judged), after the denoising loss
    loss_is_nll = False  # a denoising MSE: no perplexity
    refuse_method = staticmethod(refuse_method)

    @staticmethod
    def load_base_model(name_or_path: str, **kw: Any) -> tuple[torch.nn.Module, Any]:
        """The model loader of this task (models.load_base_model hands over to it)."""
        from ..diffusion import load_text_to_image

        return load_text_to_image(name_or_path, **kw)

    def __init__(self, spec: TaskSpec, tokenizer: Any, model: torch.nn.Module) -> None:
        from ..diffusion.sampling import base_unet

        self.spec = spec
        self.options: TextToImageOptions = spec.options
        self.labels = None
        self.tokenizer = tokenizer
        self.model = model
        unet = base_unet(model)
        self.channels, self.side = int(unet.config.in_channels), int(unet.config.sample_size)
        self.train_timesteps = int(unet.noise_scheduler.config.num_train_timesteps)
        self.judge = None
        if self.options.classifier:
            from ..diffusion import load_judge

            self.judge = load_judge(self.options.classifier)
            self.best_metric = "recognised"

    # --- features --------------------------------------------------------------------------
    def encode(self, records: Sequence[dict], with_targets: bool = True) -> list[dict[str, Any]]:
        from ..vision import read_image

        features = []
        for row in records:
            caption = self.options.caption_of(row)
            ids = self.tokenizer(caption, truncation=True)["input_ids"]
            feature: dict[str, Any] = {"caption": caption, "prompt_ids": ids}
            if with_targets:
                image = read_image(row[self.options.image], self.channels, self.options.image_root)
                feature["image"] = _resized(image, self.side)  # uint8 (S, S, C)
            features.append(feature)
        for i, feature in enumerate(features):
            feature["index"] = i  # eval noise / timesteps are seeded by the row
        return features

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from .base import pad

        ids = [f["prompt_ids"] for f in features]
        pad_id = self.tokenizer.pad_token_id or 0
        batch = {
            "prompt_ids": pad(ids, pad_id),  # (B, T)
            "prompt_mask": pad([[1] * len(i) for i in ids], 0),  # (B, T)
        }
        if "image" not in features[0]:
            return batch
        pixels = torch.from_numpy(np.stack([f["image"] for f in features]))  # (B, S, S, C)
        pixels = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1)  # (B, C, S, S) in [-1, 1]
        steps = self.train_timesteps
        if self.model.training:
            noise = torch.randn(pixels.shape)
            timesteps = torch.randint(0, steps, (len(features),))
        else:  # the same noise and timestep for a row at every evaluation
            gens = [torch.Generator().manual_seed(EVAL_SEED + f["index"]) for f in features]
            noise = torch.stack([torch.randn(pixels.shape[1:], generator=g) for g in gens])
            timesteps = torch.tensor(
                [int(torch.randint(0, steps, (1,), generator=g)) for g in gens]
            )
        batch.update(pixel_values=pixels, noise=noise, timesteps=timesteps)
        return batch

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["pixel_values"].shape[0])  # the batch loss is a mean over its images

    def feature_notes(
        self, split: str, records: Sequence[dict], features: Sequence[dict[str, Any]]
    ) -> list[str]:
        captions = sorted({f["caption"] for f in features})
        shown = ", ".join(repr(c) for c in captions[:5]) + (" ..." if len(captions) > 5 else "")
        return [f"{split}: {len(features)} images -> {self.side}x{self.side}, {self.channels} "
                f"channel(s), {len(captions)} distinct caption(s): {shown}"]  # fmt: skip

    # --- evaluation: denoising loss, then judged samples -------------------------------------
    def scored_rows(self, records: Sequence[dict]) -> list[dict]:
        """With a judge: ``samples_per_prompt`` rows per distinct (caption, label) of
        ``records``; without one, none (evaluation is the denoising loss alone)."""
        if self.judge is None:
            return []
        pairs = dict.fromkeys(
            (self.options.caption_of(r), str(r.get(self.options.label, "")).strip())
            for r in records
        )
        n = self.options.samples_per_prompt
        return [{"caption": c, "label": lab, "sample": k} for c, lab in pairs for k in range(n)]

    def predict(
        self, ctx: EvalContext, records: Sequence[dict], max_new_tokens: int | None = None
    ) -> list[str]:
        """The judge's label for one image sampled per row (seeded by the row's caption and
        ``sample``: the same image at every evaluation); "" without a judge."""
        if self.judge is None or not records:
            return []

        prompts = [self.options.caption_of(r) if "caption" not in r else r["caption"]
                   for r in records]  # fmt: skip
        seeds = [_seed(p, int(r.get("sample", i)), self.options.sample_seed)
                 for i, (p, r) in enumerate(zip(prompts, records, strict=True))]  # fmt: skip
        images = self._sample(ctx, prompts, seeds)
        return self.judge.classify(images)

    def score(
        self, records: Sequence[dict], predictions: Sequence[Any], eval_loss: float
    ) -> EvalResult:
        rows = self.scored_rows(records)
        if not rows:
            return EvalResult(metrics={}, predictions=[])
        refs = [r["label"] for r in rows]
        # the judge's label against the row's, as text without stray whitespace ("7" = " 7")
        hits = [str(p).strip() == str(t).strip() for p, t in zip(predictions, refs, strict=True)]
        metrics = {"recognised": float(np.mean(hits))}
        for label in dict.fromkeys(refs):
            mine = [h for h, t in zip(hits, refs, strict=True) if t == label]
            metrics[f"recognised/{label}"] = float(np.mean(mine))
        return EvalResult(metrics=metrics, predictions=list(predictions), references=refs,
                          rows=rows, correct=hits)  # fmt: skip

    @staticmethod
    def lower_is_better(metric: str) -> bool:
        return metric.endswith(("loss", "ppl", "perplexity"))

    # --- images ------------------------------------------------------------------------------
    def _sample(self, ctx: EvalContext, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        from ..diffusion import sample_images

        return sample_images(
            ctx.model, prompts, seeds, steps=self.options.sample_steps,
            guidance_scale=self.options.guidance_scale, batch_size=ctx.batch_size * 4,
            device=ctx.device,
        )  # fmt: skip

    def grid_prompts(self, records: Sequence[dict]) -> list[str]:
        if self.options.sample_prompts:
            return [str(p) for p in self.options.sample_prompts]
        return list(dict.fromkeys(self.options.caption_of(r) for r in records))[:10]

    def sample_grid(self, ctx: EvalContext, prompts: Sequence[str], path: Path) -> Path:
        """One row per prompt, ``samples_per_prompt`` images each (fixed seeds), as a PNG."""
        from ..diffusion import grid

        n = self.options.samples_per_prompt
        rows = [p for p in prompts for _ in range(n)]
        seeds = [_seed(p, k, self.options.sample_seed) for p in prompts for k in range(n)]
        grid(self._sample(ctx, rows, seeds), n, scale=self.options.grid_scale).save(path)
        return path

    def write_run_files(
        self, folder: Path, model: torch.nn.Module, ctx: EvalContext, records: Sequence[dict]
    ) -> list[str]:
        """After training: the adapter in diffusers' layout too, and the sample grids before
        (adapter disabled: LoRA, DoRA and AdaLoRA start as the identity) and after training.
        Returns lines for the run log."""
        from ..diffusion import save_diffusers_lora

        lines = []
        try:
            path = save_diffusers_lora(model, folder / "adapter")
            lines.append(
                f"diffusers LoRA weights: {path} (unet.* keys; load_lora_weights reads it)"
            )
        except ValueError as exc:
            lines.append(f"no diffusers LoRA file: {exc}")
        prompts = self.grid_prompts(records)
        if prompts:
            with model.disable_adapter():
                before = self.sample_grid(ctx, prompts, folder / "samples_before.png")
            after = self.sample_grid(ctx, prompts, folder / "samples_after.png")
            lines.append(f"sample grids ({len(prompts)} prompts x "
                         f"{self.options.samples_per_prompt}): {before}, {after}")  # fmt: skip
        return lines

    def generate_images(
        self, ctx: EvalContext, rows: Sequence[dict], num_images: int, seed: int, folder: Path
    ) -> list[str]:
        """``peftkit generate --prompt P --num-images N --seed S``: N images per prompt
        (seeds S, S+1, ...) as PNGs plus ``grid.png`` (one row per prompt) in ``folder``."""
        from ..diffusion import write_images

        prompts = [self.options.describe(r) for r in rows]
        every = [p for p in prompts for _ in range(num_images)]
        seeds = [seed + k for _ in prompts for k in range(num_images)]
        images = self._sample(ctx, every, seeds)
        paths = write_images(images, every, folder, num_images, scale=self.options.grid_scale)
        return [str(p) for p in paths]


def _seed(prompt: str, k: int, base: int) -> int:
    """A sampled image's seed: fixed by its prompt and its number (same image every time)."""
    return base + zlib.crc32(prompt.encode()) % 100_000 * 100 + k


def _resized(image: np.ndarray, side: int) -> np.ndarray:
    """uint8 (H, W, C) -> (side, side, C), bicubic, when the size differs."""
    if image.shape[0] == side and image.shape[1] == side:
        return image
    from PIL import Image

    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    array = np.asarray(pil.resize((side, side), Image.BICUBIC))
    return array[..., None] if array.ndim == 2 else array
