"""``PromptAdapterModel``: the adapter model of the prompt-learning family (PeftModel delegates here).

::

    PeftModel ──every call──> PromptAdapterModel
                                .model            the transformers model, frozen
                                                  (task heads wrapped as modules_to_save)
                                .prompt_encoder   {adapter name: PromptEmbedding | PromptEncoder
                                                                 | PrefixEncoder}
                                forward(...)  -> forward.py   virtual tokens into the embeddings
                                                              or the key/value cache
                                generate(...) -> generate.py  virtual tokens processed once

It holds no parameters of its own: PeftModel registers its two modules under HF PEFT's names
(``base_model`` = the transformers model, ``prompt_encoder``), which name every in-memory key.
On disk (HF PEFT's format): ``prompt_embeddings`` = the encoder's output table, plus the task
head under ``base_model.<path>.weight``. P-tuning and prefix-projection adapters also store their
encoder as ``prompt_encoder.<param>`` so training can resume; PEFT ignores those keys. A file
holding only ``prompt_embeddings`` (PEFT's) loads such an encoder in *direct* mode.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ... import checkpoint
from ...adapter_model import BASE_MODEL
from ...config import PeftType
from ...inject import ModulesToSaveWrapper, wrap_modules_to_save
from .config import PromptLearningConfig
from .encoders import VirtualTokenEncoder, build_encoder
from .forward import embedding_forward, prefix_forward
from .generate import generate_with_prompt
from .support import fill_config, word_embeddings

TABLE_KEY = "prompt_embeddings"
ENCODER_PREFIX = "prompt_encoder."


class PromptAdapterModel:
    """Named prompt-learning adapters over one frozen model (the :class:`AdapterModel` interface)."""

    def __init__(self, model: nn.Module, config: PromptLearningConfig, adapter_name: str) -> None:
        self.model = model
        self.prompt_encoder = nn.ModuleDict()
        self.peft_config: dict[str, PromptLearningConfig] = {}
        self.active_adapter = adapter_name
        self.disabled = False
        self.add_adapter(adapter_name, config)

    def peft_modules(self) -> dict[str, nn.Module]:
        return {BASE_MODEL: self.model, "prompt_encoder": self.prompt_encoder}

    def get_base_model(self) -> nn.Module:
        return self.model

    # --- adapters by name ----------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: PromptLearningConfig) -> None:
        """Check the model for ``config``, build the encoder and freeze the base model."""
        if adapter_name in self.peft_config:
            raise ValueError(
                f"an adapter named {adapter_name!r} already exists; pick another name or "
                f"delete_adapter({adapter_name!r}) first"
            )
        fill_config(self.model, config)
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.prompt_encoder[adapter_name] = build_encoder(self.model, config).to(self._device())
        if config.modules_to_save:
            wrap_modules_to_save(self.model, config.modules_to_save, adapter_name)
        self.peft_config[adapter_name] = config
        self.set_adapter(
            self.active_adapter if self.active_adapter in self.peft_config else adapter_name
        )

    def set_adapter(self, adapter_name: str) -> None:
        """Route forward through ``adapter_name``; only it (encoder and head copy) trains."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; have {list(self.peft_config)}")
        self.active_adapter = adapter_name
        for wrapper in self._save_wrappers():
            wrapper.set_adapter(adapter_name)
        self.mark_trainable()

    def mark_trainable(self) -> None:
        """Only the active adapter's encoder and head copies train (none in inference mode)."""
        name = self.active_adapter
        trainable = not self.peft_config[name].inference_mode
        for key, encoder in self.prompt_encoder.items():
            encoder.requires_grad_(trainable and key == name)
        for wrapper in self._save_wrappers():
            for key, copy_ in wrapper.modules_to_save.items():
                copy_.requires_grad_(trainable and key == name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the encoder and head copies of ``adapter_name``."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; have {list(self.peft_config)}")
        del self.prompt_encoder[adapter_name]
        for wrapper in self._save_wrappers():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    def set_disabled(self, disabled: bool) -> None:
        """While disabled: no virtual tokens, and the original (untrained) task heads."""
        self.disabled = disabled
        for wrapper in self._save_wrappers():
            wrapper.disable_adapters = disabled

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: list[str] | None) -> Iterator[None]:
        """Refuses per-row adapters: virtual tokens change the sequence length of the batch."""
        if adapter_names is not None:
            raise ValueError(
                "adapter_names (a different adapter per row) applies to LoRA-style adapters; a "
                "prompt-learning model runs its active adapter on the whole batch: call "
                "set_adapter(name) between batches"
            )
        yield

    def check_training_step(self) -> None:
        """Prompt methods have no per-step duties."""

    # --- running -------------------------------------------------------------------------------
    def __call__(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward with the active adapter's virtual tokens."""
        kwargs = _by_name(args, kwargs, "a prompt-learning model")
        with self.mixed_batch(adapter_names):
            if self.disabled:
                return self.model(**kwargs)
            config = self.peft_config[self.active_adapter]
            table = self.prompt_encoder[self.active_adapter]()  # (1, rows, width)
            if config.peft_type == PeftType.PREFIX_TUNING:
                return prefix_forward(self.model, config, table, kwargs)
            return embedding_forward(self.model, config, table, kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """``generate`` of the base model with the virtual tokens processed once and cached."""
        kwargs = _by_name(args, kwargs, "generate()")
        with self.mixed_batch(adapter_names):
            if self.disabled:
                return self.model.generate(**kwargs)
            with torch.no_grad():
                table = self.prompt_encoder[self.active_adapter]()  # (1, rows, width)
            config = self.peft_config[self.active_adapter]
            return generate_with_prompt(self.model, config, table, kwargs)

    # --- merging: nothing to merge ---------------------------------------------------------------
    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False
    ) -> None:
        _no_weights("merge_adapter")

    def unmerge_adapter(self) -> None:
        _no_weights("unmerge_adapter")

    def merge_and_unload(
        self, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        _no_weights("merge_and_unload")

    def unload(self) -> nn.Module:
        _no_weights("unload")

    # --- saving and loading --------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """``prompt_embeddings`` (+ encoder weights when reparameterised) + head copies."""
        encoder = self.prompt_encoder[adapter_name]
        out = {TABLE_KEY: encoder.output_table()}
        if encoder.reparameterized:
            for key, tensor in encoder.state_dict().items():
                out[ENCODER_PREFIX + key] = tensor
        state = self.model.state_dict(prefix=BASE_MODEL + ".")
        for disk, key in self._head_keys(adapter_name).items():
            out[disk] = state[key]
        return out

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], adapter_name: str) -> None:
        """Load a prompt adapter saved by peftkit or HF PEFT, refusing tensors that do not fit."""
        config = self.peft_config[adapter_name]
        heads = self._head_keys(adapter_name)
        encoder_state = {
            k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)
        }
        unexpected = [
            k
            for k in state
            if k != TABLE_KEY and k not in heads and not k.startswith(ENCODER_PREFIX)
        ]
        missing = [k for k in heads if k not in state]
        if TABLE_KEY not in state:
            missing.append(TABLE_KEY)
        if unexpected or missing:
            parts = []
            if missing:
                parts.append(f"missing keys: {checkpoint.describe_keys(missing)}")
            if unexpected:
                parts.append(f"unexpected keys: {checkpoint.describe_keys(unexpected)}")
            raise ValueError(
                f"adapter does not fit this {config.peft_type.value} model ({'; '.join(parts)}); "
                f"check that it was saved for this method, task ({config.task_type.value}) and "
                f"base model ({config.base_model_name_or_path!r})"
            )
        encoder = self.prompt_encoder[adapter_name]
        _load_encoder(encoder, state[TABLE_KEY], encoder_state, config)
        params = dict(self.model.named_parameters(prefix=BASE_MODEL))
        params.update(dict(self.model.named_buffers(prefix=BASE_MODEL)))
        with torch.no_grad():
            for disk, key in heads.items():
                _copy_checked(params[key], state[disk], disk)

    # --- helpers -------------------------------------------------------------------------------
    def _save_wrappers(self) -> list[ModulesToSaveWrapper]:
        return [m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper)]

    def _head_keys(self, adapter_name: str) -> dict[str, str]:
        """On-disk name -> in-memory key (``base_model.<path>``) of each modules_to_save tensor."""
        out = {}
        for key in self.model.state_dict(prefix=BASE_MODEL + "."):
            if ".modules_to_save." in key:
                disk = checkpoint.saved_key(key, adapter_name, ())
                if disk is not None:
                    out[disk] = key
        return out

    def _device(self) -> torch.device:
        try:
            return word_embeddings(self.model).weight.device
        except ValueError:
            return next(self.model.parameters()).device


def _by_name(args: tuple, kwargs: dict[str, Any], what: str) -> dict[str, Any]:
    """Prompt methods rewrite named inputs; a lone positional argument is ``input_ids``."""
    if args:
        if len(args) > 1 or "input_ids" in kwargs:
            raise TypeError(f"pass inputs to {what} by name (input_ids=...)")
        kwargs["input_ids"] = args[0]
    return kwargs


def _no_weights(what: str) -> None:
    raise ValueError(
        f"{what} applies to LoRA-style adapters; prompt methods have no weights to merge"
    )


def _load_encoder(
    encoder: VirtualTokenEncoder,
    table: torch.Tensor,
    encoder_state: dict[str, torch.Tensor],
    config: PromptLearningConfig,
) -> None:
    rows_width = tuple(table.shape)
    if rows_width != tuple(encoder.expected_table_shape()):
        raise ValueError(
            f"prompt_embeddings has shape {rows_width} but this model expects "
            f"{tuple(encoder.expected_table_shape())} (num_virtual_tokens x width); the "
            f"adapter was made for another base model or number of virtual tokens"
        )
    if encoder.reparameterized and encoder_state:
        own = encoder.state_dict()
        if set(own) != set(encoder_state):
            raise ValueError(
                f"the saved prompt encoder has parameters {sorted(encoder_state)} but this "
                f"config builds {sorted(own)}; the adapter_config.json does not match its weights"
            )
        with torch.no_grad():
            for key, tensor in own.items():
                _copy_checked(tensor, encoder_state[key], ENCODER_PREFIX + key)
        recomputed = encoder.output_table()
        if not torch.allclose(recomputed, table.to(recomputed), rtol=1e-4, atol=1e-5):
            warnings.warn(
                "the saved prompt encoder does not reproduce the saved prompt_embeddings; "
                "using the encoder (was one of them edited after saving?)",
                stacklevel=4,
            )
        return
    if encoder.reparameterized:
        if not config.inference_mode:
            warnings.warn(
                f"this {config.peft_type.value} adapter holds only prompt_embeddings (saved by "
                f"HF PEFT, which drops the encoder network): training continues on the "
                f"embeddings directly, without the reparameterising network",
                stacklevel=4,
            )
        encoder.use_direct_table(table.to(encoder.embedding.weight.device))
        return
    with torch.no_grad():
        _copy_checked(encoder.embedding.weight, table, TABLE_KEY)


def _copy_checked(target: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(target.shape) != tuple(value.shape):
        raise ValueError(
            f"adapter tensor {name} has shape {tuple(value.shape)} but the model expects "
            f"{tuple(target.shape)}: the adapter was made for a different base model"
        )
    target.copy_(value.to(device=target.device, dtype=target.dtype))
