"""Text-to-image: (image, caption) rows -> a LoRA that teaches a diffusion UNet a new concept.

::

    base: a Stable Diffusion folder (latent space: VAE, CLIP) or peftkit's pixel-space folder
    rows {image: path | array, caption}  (CSV/JSONL of paths + captions; an image folder or
         MNIST idx rows + task.caption_template, e.g. "a handwritten {label}"; a plain folder of
         images + task.instance_prompt for DreamBooth)
      ──encode──> each image read once (the VAE's / UNet's channel count; a bad file is an error
                  naming it), shorter side resized to task.resolution (:mod:`.t2i_images`); the
                  caption tokenized as the base's conditioning pads it; task.cache_latents: the
                  VAE's latent distribution instead of the image (:mod:`.t2i_latent_cache`);
                  DreamBooth class images paired in (:mod:`.t2i_dreambooth`)
      ──collate──> crop / flip -> pixel_values (B, C, R, R) in [-1, 1] | cached latent_mean/std;
                   latent_noise (latent layout), noise ε, timesteps (B,), row_weights (DreamBooth
                   prior term, min-SNR): torch's generator while the model trains (resume repeats
                   it), each row's own seeded generator at evaluation (a deterministic loss)
      ──model──> DenoisingOutput.loss (diffusers' formulation: :mod:`peftkit.diffusion.model`)
    evaluation: the held-out denoising loss and, with task.classifier, images sampled per
      distinct (caption, label) of the eval rows, judged: ``recognised`` = the share shown as the
      prompted label (``recognised/<label>`` per label); predictions = those labels
    finish (write_run_files): adapter/pytorch_lora_weights.safetensors (diffusers' layout),
      samples_before.png (adapter disabled = the base model) and samples_after.png
    generate: --prompt ... --negative-prompt --guidance-scale --steps --num-images N --seed S
      -> PNGs + grid.png, the images diffusers' pipeline draws with the same settings

Only adapters that go into the UNet's (or text encoder's) layers apply: the task's row is a
``diffusion`` model, and the method table refuses methods that do not serve that family
(prompt-learning methods, and QLoRA's 4-bit base).
"""

from __future__ import annotations

import dataclasses
import string
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .base import EvalContext, EvalResult, Task, TaskOptions, TaskSpec

EVAL_SEED = 1234  # the noise and timesteps of eval row i come from seed EVAL_SEED + i
CLASS_SEED = 7_000_000  # seeds of sampled DreamBooth class images (+ sample_seed + k)


@dataclasses.dataclass
class TextToImageOptions(TaskOptions):
    """Attributes:
    image: the column holding an image path (or an array, as MNIST's idx rows do).
    caption: the caption column (rows from CSV/JSONL).
    caption_template: build the caption from other columns instead, e.g. ``"a handwritten
        {label}"`` for image folders (the label is the folder name).
    label: the column naming what each image shows, for the judge (default ``label``).
    image_root: folder that relative image paths start from (default: the working directory).
    resolution: training image side (default: the UNet's sample_size x the VAE's factor, 512
        for SD 1.5); a multiple of the VAE's factor.
    center_crop: crop the centre (else a random crop each time, diffusers' default).
    random_flip: flip training images left-right with probability 1/2.
    interpolation: resizing filter (lanczos, bicubic, bilinear, box, hamming, nearest).
    cache_latents: encode each training image with the VAE once (latent layout).
    snr_gamma: min-SNR loss weighting γ (diffusers' ``--snr_gamma``; 5.0 is the usual value).
    noise_offset: add ``noise_offset`` · N(0, 1) per image and channel to the noise.
    instance_prompt: DreamBooth: the caption of every row ("a photo of sks dog").
    class_data: DreamBooth prior preservation: a folder of class images.
    class_prompt: their caption ("a photo of dog").
    prior_loss_weight: weight of the class images' loss.
    num_class_images: class images to use; missing ones are sampled from the base model into
        ``class_data`` before training (default: those in the folder).
    classifier: a judge folder (:mod:`peftkit.diffusion.judge`): evaluation samples images and
        reports the share recognised as the prompted label.
    samples_per_prompt: images sampled per distinct eval caption (with ``classifier``) and per
        prompt in the sample grids.
    sample_prompts: the grids' prompts (default: the distinct eval captions, at most 10).
    sample_steps: denoising steps when sampling.
    guidance_scale: classifier-free guidance (1: none; the base must have learnt "" prompts).
    negative_prompt: the unconditional prompt of guidance (default "").
    sampler: ``folder`` (the base folder's scheduler), ``ddim``, ``ddpm``, ``pndm``, ``euler``,
        ``euler_a``, ``dpm++`` or a diffusers scheduler class; default: the folder's for
        Stable Diffusion, ddim for the pixel layout.
    sample_seed: seed of the first sampled image (image k: ``sample_seed + k``).
    grid_scale: sample grids are drawn this many times larger (small images).
    """

    image: str = "image"
    caption: str = "caption"
    caption_template: str | None = None
    label: str = "label"
    image_root: str | None = None
    resolution: int | None = None
    center_crop: bool = False
    random_flip: bool = False
    interpolation: str = "lanczos"
    cache_latents: bool = False
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    instance_prompt: str | None = None
    class_data: str | None = None
    class_prompt: str | None = None
    prior_loss_weight: float = 1.0
    num_class_images: int | None = None
    classifier: str | None = None
    samples_per_prompt: int = 4
    sample_prompts: list[str] | None = None
    sample_steps: int = 25
    guidance_scale: float = 1.0
    negative_prompt: str | None = None
    sampler: str | None = None
    sample_seed: int = 0
    grid_scale: int = 2

    local_paths: ClassVar[tuple[str, ...]] = ("classifier",)

    def __post_init__(self) -> None:
        from .t2i_images import INTERPOLATIONS

        for name in ("samples_per_prompt", "sample_steps", "grid_scale"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if float(self.guidance_scale) < 1.0:
            raise ValueError(f"guidance_scale must be >= 1, got {self.guidance_scale}")
        if self.resolution is not None and int(self.resolution) < 8:
            raise ValueError(f"resolution must be at least 8 pixels, got {self.resolution}")
        if str(self.interpolation).lower() not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation {self.interpolation!r}: use one of {', '.join(INTERPOLATIONS)}"
            )
        if self.snr_gamma is not None and float(self.snr_gamma) <= 0:
            raise ValueError(f"snr_gamma must be > 0 (5.0 is usual), got {self.snr_gamma}")
        if float(self.prior_loss_weight) < 0:
            raise ValueError(f"prior_loss_weight must be >= 0, got {self.prior_loss_weight}")
        if self.class_data and not self.class_prompt:
            raise ValueError("class_data needs class_prompt (e.g. 'a photo of dog'), the class "
                             "images' caption")  # fmt: skip
        if self.class_prompt and not self.class_data:
            raise ValueError("class_prompt needs class_data: the folder of class images (it may "
                             "start empty with num_class_images set: they are sampled)")  # fmt: skip
        if self.class_data and not self.instance_prompt:
            raise ValueError("class_data (DreamBooth prior preservation) needs instance_prompt, "
                             "e.g. 'a photo of sks dog'")  # fmt: skip
        if self.num_class_images is not None and int(self.num_class_images) < 1:
            raise ValueError(f"num_class_images must be at least 1, got {self.num_class_images}")

    @property
    def dreambooth(self) -> bool:
        """Prior preservation: class images paired with the instance images."""
        return bool(self.class_data)

    def template_fields(self) -> list[str]:
        if self.caption_template is None:
            return []
        return [f for _, f, _, _ in string.Formatter().parse(self.caption_template) if f]

    def caption_of(self, row: Mapping[str, Any]) -> str:
        if self.instance_prompt is not None:
            return self.instance_prompt
        if self.caption_template is not None:
            return self.caption_template.format(**{f: row[f] for f in self.template_fields()})
        return str(row[self.caption])

    def input_columns(self) -> list[str]:
        if self.instance_prompt is not None:
            return []
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
        if self.caption in row or self.template_fields() or self.instance_prompt is not None:
            return {"caption": self.caption_of(row)}
        raise ValueError(f"the model reads captions from column {self.caption!r}; give --prompt")

    def describe(self, row: Mapping[str, Any]) -> str:
        return str(row.get("caption", ""))


class TextToImage(Task):
    """``task.type: text_to_image``."""

    Options = TextToImageOptions
    generates = True  # evaluation samples images (judged), after the denoising loss
    loss_is_nll = False  # a denoising MSE: no perplexity

    def __init__(self, spec: TaskSpec, tokenizer: Any, model: torch.nn.Module) -> None:
        from ..diffusion.sampling import base_unet

        self.spec = spec
        self.options: TextToImageOptions = spec.options
        self.labels = None
        self.tokenizer = tokenizer
        self.model = model
        unet = self.unet = base_unet(model)
        self.latent = bool(unet.latent)
        self.channels = int(unet.image_channels)
        self.resolution = int(self.options.resolution or unet.default_resolution)
        factor = int(unet.vae_factor)
        if self.resolution % factor:
            lower = self.resolution // factor * factor
            raise ValueError(
                f"task.resolution {self.resolution} is not a multiple of the VAE's downsampling "
                f"factor {factor} (vae/config.json: {len(unet.vae.config.block_out_channels)} "
                f"blocks); use {lower or factor} or {lower + factor}"
            )
        self.latent_side = self.resolution // factor
        self.latent_channels = int(unet.config.in_channels)
        self.scheduler = unet.noise_scheduler
        self.train_timesteps = int(self.scheduler.config.num_train_timesteps)
        if self.options.cache_latents and not self.latent:
            raise ValueError(
                "task.cache_latents: this base is pixel-space (no vae/): there are no latents "
                "to cache; remove the option or use a Stable Diffusion folder"
            )
        self._class_features: list[dict[str, Any]] | None = None
        self._sampled_class_images: list[Path] = []
        self.judge = None
        if self.options.classifier:
            from ..diffusion import load_judge

            self.judge = load_judge(self.options.classifier)
            self.best_metric = "recognised"

    # --- features --------------------------------------------------------------------------
    def _image_feature(self, value: Any, caption: str) -> dict[str, Any]:
        """One image read, resized (shorter side = resolution) and tokenized with its caption."""
        from ..vision import read_image
        from ..vision.preprocess import ImageReadError
        from .t2i_images import resize_shorter

        try:
            image = read_image(value, self.channels, self.options.image_root)
        except ImageReadError as exc:
            if not self.latent or "channel(s)" not in str(exc):
                raise
            found = str(exc)[len(exc.where) + 2 :].split(" but ")[0]  # "image has 3 channel(s)"
            raise ImageReadError(
                exc.where,
                f"{found} but the VAE reads {self.channels} (vae/config.json in_channels); "
                f"convert the images to {self.channels} channel(s) or use a VAE made for them",
            ) from None
        return {
            "caption": caption,
            "prompt_ids": self.unet.tokenize_one(caption),
            "image": resize_shorter(image, self.resolution, self.options.interpolation.lower()),
            "source": str(value) if isinstance(value, (str, Path)) else "an image array",
        }

    def encode(self, records: Sequence[dict], with_targets: bool = True) -> list[dict[str, Any]]:
        features = []
        for row in records:
            caption = self.options.caption_of(row)
            if with_targets:
                features.append(self._image_feature(row[self.options.image], caption))
            else:
                features.append({"caption": caption,
                                 "prompt_ids": self.unet.tokenize_one(caption)})  # fmt: skip
        if with_targets:
            features = self._cached(features)
            if self.options.dreambooth:
                from .t2i_dreambooth import paired

                features = paired(features, self.class_features())
        for i, feature in enumerate(features):
            feature["index"] = i  # eval noise / timesteps are seeded by the row
        return features

    def _cached(self, features: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """With task.cache_latents: each image's latent distribution in place of the image."""
        if not self.options.cache_latents or not features:
            return features
        from .t2i_latent_cache import check_cacheable, encode_latents

        check_cacheable(features, self.resolution, self.options.center_crop)
        cached = encode_latents(self.unet, [f["image"] for f in features], self.resolution,
                                self.options.random_flip)  # fmt: skip
        return [{**{k: v for k, v in f.items() if k != "image"}, **c}
                for f, c in zip(features, cached, strict=True)]  # fmt: skip

    def class_features(self) -> list[dict[str, Any]]:
        """DreamBooth's class images as features (missing ones sampled first), read once."""
        if self._class_features is not None:
            return self._class_features
        from .t2i_dreambooth import class_image_files, sample_missing_class_images

        options = self.options
        self._sampled_class_images = []
        if options.num_class_images:
            self._sampled_class_images = sample_missing_class_images(
                self.model, options.class_data, options.class_prompt,
                int(options.num_class_images), CLASS_SEED + options.sample_seed,
                lambda prompts, seeds: self._sample_with(None, prompts, seeds),
            )  # fmt: skip
        files = class_image_files(options.class_data)
        if options.num_class_images:
            files = files[: int(options.num_class_images)]
        if not files:
            raise ValueError(
                f"task.class_data: no images in {options.class_data}; add class images or set "
                "task.num_class_images to sample them from the base model"
            )
        features = [self._image_feature(str(f), options.class_prompt) for f in files]
        self._class_features = self._cached(features)
        return self._class_features

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from .base import pad

        rows = list(features)
        if "prior" in rows[0]:  # DreamBooth: B instance rows, then their B class rows
            rows = rows + [f["prior"] for f in features]
        ids = [f["prompt_ids"] for f in rows]
        pad_id = self.tokenizer.pad_token_id or 0
        batch = {
            "prompt_ids": pad(ids, pad_id),  # (B, T)
            "prompt_mask": pad([[1] * len(i) for i in ids], 0),  # (B, T)
        }
        if "image" not in rows[0] and "latent_mean" not in rows[0]:
            return batch
        batch.update(self._targets(rows, n_instance=len(features)))
        return batch

    def _targets(self, rows: list[dict[str, Any]], n_instance: int) -> dict[str, torch.Tensor]:
        """x0's source, the noise, timesteps (and weights) of ``rows`` (module docstring)."""
        from .t2i_images import flip_drawn, prepared

        training = self.model.training
        gens: list[torch.Generator | None] = (
            [None] * len(rows) if training
            else [torch.Generator().manual_seed(EVAL_SEED + f["index"]) for f in rows]
        )  # fmt: skip
        out: dict[str, torch.Tensor] = {}
        if "image" in rows[0]:
            out["pixel_values"] = torch.stack([
                prepared(f["image"], self.resolution, training, self.options.center_crop,
                         self.options.random_flip, g)
                for f, g in zip(rows, gens, strict=True)
            ])  # (B, C, R, R)  # fmt: skip
        else:  # cached latents: one orientation per row
            flips = [training and self.options.random_flip and flip_drawn(g) for g in gens]
            for key in ("mean", "std"):
                out[f"latent_{key}"] = torch.stack(
                    [f[f"flip_{key}" if flip else f"latent_{key}"]
                     for f, flip in zip(rows, flips, strict=True)]
                )  # (B, C_lat, h, w)  # fmt: skip
        b = len(rows)
        side = self.latent_side if self.latent else self.resolution
        shape = (self.latent_channels, side, side)
        steps = self.train_timesteps
        offset = float(self.options.noise_offset)
        if training:
            if self.latent:
                out["latent_noise"] = torch.randn((b, *shape))
            noise = torch.randn((b, *shape))
            timesteps = torch.randint(0, steps, (b,))
            if offset:
                noise = noise + offset * torch.randn((b, shape[0], 1, 1))
        else:  # the same noise and timestep for a row at every evaluation
            noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
            timesteps = torch.tensor(
                [int(torch.randint(0, steps, (1,), generator=g)) for g in gens]
            )
            if self.latent:
                out["latent_noise"] = torch.stack([torch.randn(shape, generator=g) for g in gens])
            if offset:
                noise = noise + offset * torch.stack(
                    [torch.randn((shape[0], 1, 1), generator=g) for g in gens]
                )
        out.update(noise=noise, timesteps=timesteps)
        weights = self._row_weights(timesteps, n_instance)
        if weights is not None:
            out["row_weights"] = weights
        return out

    def _row_weights(self, timesteps: torch.Tensor, n_instance: int) -> torch.Tensor | None:
        """w_i · m_i of the loss (model docstring), or None for the plain mean."""
        dreambooth = len(timesteps) > n_instance
        gamma = self.options.snr_gamma
        if not dreambooth and gamma is None:
            return None
        weights = torch.full((len(timesteps),), 1.0 / n_instance)
        if dreambooth:
            weights[n_instance:] *= float(self.options.prior_loss_weight)
        if gamma is not None:
            from ..diffusion.model import snr_weights

            kind = str(self.scheduler.config.prediction_type)
            weights = weights * snr_weights(self.scheduler, timesteps, float(gamma), kind)
        return weights

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["timesteps"].shape[0])  # the batch loss is a mean over its images

    def feature_notes(
        self, split: str, records: Sequence[dict], features: Sequence[dict[str, Any]]
    ) -> list[str]:
        captions = sorted({f["caption"] for f in features})
        shown = ", ".join(repr(c) for c in captions[:5]) + (" ..." if len(captions) > 5 else "")
        space = (f"latents {self.latent_channels}x{self.latent_side}x{self.latent_side}"
                 + (" (cached)" if self.options.cache_latents else "")
                 if self.latent else "pixel space")  # fmt: skip
        notes = [f"{split}: {len(records)} images -> {self.resolution}x{self.resolution}, "
                 f"{self.channels} channel(s), {space}, {len(captions)} distinct caption(s): "
                 f"{shown}"]  # fmt: skip
        if features and "prior" in features[0]:
            n_class = len({id(f["prior"]) for f in features})
            notes.append(f"{split}: DreamBooth: {len(features)} pairs of {len(records)} instance "
                         f"and {n_class} class image(s) ({self.options.class_prompt!r}), "
                         f"prior_loss_weight {self.options.prior_loss_weight}")  # fmt: skip
            sampled = self._sampled_class_images
            if sampled:
                notes.append(f"{split}: DreamBooth: {len(sampled)} class image(s) sampled from the "
                             f"base model into {Path(sampled[0]).parent} first")  # fmt: skip
        return notes

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
    def sampling(self, **overrides: Any) -> Any:
        """The task's :class:`~peftkit.diffusion.SamplingOptions`, ``overrides`` (not None) applied."""
        from ..diffusion import SamplingOptions

        o = self.options
        options = SamplingOptions(steps=o.sample_steps, guidance_scale=o.guidance_scale,
                                  negative_prompt=o.negative_prompt, sampler=o.sampler)  # fmt: skip
        return dataclasses.replace(options, **{k: v for k, v in overrides.items() if v is not None})

    def _sample(
        self, ctx: EvalContext, prompts: list[str], seeds: list[int], sampling: Any = None
    ) -> torch.Tensor:
        return self._sample_with(ctx, prompts, seeds, sampling)

    def _sample_with(
        self, ctx: EvalContext | None, prompts: list[str], seeds: list[int], sampling: Any = None
    ) -> torch.Tensor:
        from ..diffusion import sample_images

        s = sampling or self.sampling()
        return sample_images(
            ctx.model if ctx is not None else self.model, prompts, seeds, steps=s.steps,
            guidance_scale=s.guidance_scale, sampler=s.sampler,
            batch_size=ctx.batch_size * 4 if ctx is not None else 16,
            device=ctx.device if ctx is not None else None,
            negative_prompt=s.negative_prompt, eta=s.eta,
        )  # fmt: skip

    def grid_prompts(self, records: Sequence[dict]) -> list[str]:
        if self.options.sample_prompts:
            return [str(p) for p in self.options.sample_prompts]
        return list(dict.fromkeys(self.options.caption_of(r) for r in records))[:10]

    def sample_grid(self, ctx: EvalContext, prompts: Sequence[str], path: Path) -> Path:
        """One row per prompt, ``samples_per_prompt`` images each (fixed seeds), as a PNG."""
        from ..diffusion import grid, save_png

        n = self.options.samples_per_prompt
        rows = [p for p in prompts for _ in range(n)]
        seeds = [_seed(p, k, self.options.sample_seed) for p in prompts for k in range(n)]
        images = self._sample(ctx, rows, seeds)
        return save_png(grid(images, n, scale=self.options.grid_scale), path)

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
            kind = model.active_peft_config.peft_type.value
            lines.append(
                f"diffusers {kind} weights: {path} (unet.* keys; load_lora_weights reads it)"
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
        self,
        ctx: EvalContext,
        rows: Sequence[dict],
        num_images: int,
        seed: int,
        folder: Path,
        sampling: Any = None,
    ) -> list[str]:
        """``peftkit generate --prompt P --num-images N --seed S``: N images per prompt (image k
        of a prompt drawn from seed S + k, as diffusers' pipeline draws it with
        ``generator=[torch.Generator().manual_seed(S + k) for k in range(N)]``) as PNGs plus
        ``grid.png`` (one row per prompt) in ``folder``; ``sampling`` overrides the task's."""
        from ..diffusion import write_images

        prompts = [self.options.describe(r) for r in rows]
        every = [p for p in prompts for _ in range(num_images)]
        seeds = [seed + k for _ in prompts for k in range(num_images)]
        images = self._sample(ctx, every, seeds, sampling)
        paths = write_images(images, every, folder, num_images, scale=self.options.grid_scale)
        return [str(p) for p in paths]


def _seed(prompt: str, k: int, base: int) -> int:
    """A sampled image's seed: fixed by its prompt and its number (same image every time)."""
    return base + zlib.crc32(prompt.encode()) % 100_000 * 100 + k
