"""Adapter configurations: the base dataclass, task/method enums and JSON I/O.

Every method's config is a dataclass whose field names and JSON keys are HF PEFT's, so an
``adapter_config.json`` written by either library reads in the other::

    adapter_config.json --read_config--> dict --config_from_dict--> LoraConfig | AdaLoraConfig | ...
                                          (peft_type picks the class: config_class)

A config class says what its method can do (``adapts``: what in the model it changes;
``model_families``: which kinds of base model it serves), so tasks and the trainer ask the class
instead of testing method names; :mod:`peftkit.methods.table` lists the methods a run can name.
A concrete config class (one that sets ``peft_type``) is found by ``config_class`` from the moment
it is defined: nobody keeps a second list of them.

Keys we do not know are warned about and dropped (a config from a newer version must not crash
an older reader); keys PEFT knows but peftkit does not implement are accepted silently while they
hold PEFT's default and refused when they hold anything else, because silently ignoring e.g.
``use_dora: true`` would load a different model.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from typing import Any, ClassVar

CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    """What the wrapped model does; picks the PeftModel task wrapper (PEFT's names)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """Adapter method identifiers as written in ``adapter_config.json``."""

    LORA = "LORA"
    ADALORA = "ADALORA"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LOHA = "LOHA"
    LOKR = "LOKR"
    IA3 = "IA3"


class Adapts(str, enum.Enum):
    """What a method changes in the model it adapts (a config class's ``adapts``).

    Tasks and the trainer ask this instead of a method's name: a decoder classifier pads left
    when the model reads embeddings instead of ``input_ids``, packing refuses virtual tokens.
    """

    LAYERS = "layers"  # adapter layers injected into the model's own layers (LoRA, AdaLoRA)
    INPUT_EMBEDDINGS = "input_embeddings"  # virtual tokens before the input embeddings
    KV_PREFIX = "kv_prefix"  # virtual keys/values before every attention layer's cache

    @property
    def virtual_tokens(self) -> bool:
        """Whether positions the data does not hold come before every row."""
        return self is not Adapts.LAYERS

    @property
    def description(self) -> str:
        """What the method does to the model, for messages that say why it does not apply."""
        return {
            Adapts.LAYERS: "it adds adapter layers to the model's own layers",
            Adapts.INPUT_EMBEDDINGS: "it prepends virtual tokens to a text model's input "
            "embeddings",
            Adapts.KV_PREFIX: "it prepends virtual keys and values to a text model's attention "
            "cache",
        }[self]


class ModelFamily(str, enum.Enum):
    """Kinds of base model: a task's table row names its family, a method the families it serves."""

    TEXT = "text"  # transformers language models and text encoders (token embeddings)
    VISION = "vision"  # image classifiers: transformers (ViT) or plain PyTorch networks
    DIFFUSION = "diffusion"  # a diffusion UNet with its text encoder (text-to-image)


# PEFT fields peftkit does not implement, with the value that means "feature off". Any other value
# changes the maths, so loading such a config is refused rather than silently mis-read.
_PEFT_INERT_FIELDS: dict[str, Any] = {
    "peft_version": Any,  # informational
    "auto_mapping": Any,
    "megatron_config": None,
    "megatron_core": Any,
    "use_dora": False,
    "lora_bias": False,
    "layer_replication": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "arrow_config": None,
    "kasa_config": None,
    "lora_ga_config": None,
    "monteclora_config": None,
    "use_qalora": False,
    "qalora_group_size": Any,
    "use_bdlora": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "ensure_weight_tying": Any,
    "modules_to_save": None,
}


@dataclasses.dataclass
class PeftConfig:
    """Fields shared by every adapter method.

    Attributes:
        task_type: what the base model does (see :class:`TaskType`); ``None`` for a bare model.
        base_model_name_or_path: the base model the adapter was trained on (recorded, checked on load).
        revision: hub revision of the base model, when one was used.
        inference_mode: ``True`` freezes the adapter (set by ``from_pretrained`` unless
            ``is_trainable=True``).
    """

    peft_type: ClassVar[PeftType]
    is_prompt_learning: ClassVar[bool] = False
    # What the method can do, declared by each method's config class (no default: a new method
    # says it): what it changes in the model, and the kinds of base model it serves.
    adapts: ClassVar[Adapts]
    model_families: ClassVar[frozenset[ModelFamily]]

    task_type: TaskType | str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A class that sets its own ``peft_type`` is what ``config_class`` returns for it (the
        first one defined: subclasses that keep their parent's type do not replace it)."""
        super().__init_subclass__(**kwargs)
        peft_type = cls.__dict__.get("peft_type")
        if peft_type is not None:
            _CONFIG_CLASSES.setdefault(PeftType(peft_type), cls)

    def __post_init__(self) -> None:
        if isinstance(self.task_type, str):
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                valid = ", ".join(t.value for t in TaskType)
                raise ValueError(
                    f"unknown task_type {self.task_type!r}; use one of: {valid}"
                ) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with PEFT's key names (sets are written as sorted lists)."""
        out: dict[str, Any] = {"peft_type": self.peft_type.value}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, (set, frozenset)):
                value = sorted(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build from a dict, warning about (and dropping) keys this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in data.items():
            if key == "peft_type":
                continue
            if key in names:
                kwargs[key] = value
            elif key in _PEFT_INERT_FIELDS:
                default = _PEFT_INERT_FIELDS[key]
                if default is not Any and value not in (default, None, {}, [], False):
                    raise ValueError(
                        f"adapter config sets {key}={value!r}, a PEFT feature peftkit does not "
                        f"implement; loading it as plain {cls.__name__} would give wrong outputs. "
                        f"Remove the key only if the adapter was trained without it."
                    )
            else:
                unknown.append(key)
        if unknown:
            warnings.warn(
                f"{cls.__name__}: ignoring config keys unknown to this peftkit version: "
                f"{', '.join(sorted(unknown))} (written by a newer version?)",
                stacklevel=2,
            )
        return cls(**kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` atomically."""
        from .checkpoint import atomic_write_text

        os.makedirs(directory, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write_text(os.path.join(directory, CONFIG_NAME), text)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> PeftConfig:
        """Read ``adapter_config.json`` from a folder; the ``peft_type`` picks the class."""
        return read_config(directory)


# peft_type -> the config class that declares it, filled as the classes are defined
# (PeftConfig.__init_subclass__); peftkit's own are all defined once ``peftkit`` is imported.
_CONFIG_CLASSES: dict[PeftType, type[PeftConfig]] = {}


def config_class(peft_type: PeftType | str) -> type[PeftConfig]:
    """The config class for ``peft_type``, with a clear error when unknown."""
    try:
        return _CONFIG_CLASSES[PeftType(peft_type)]
    except (ValueError, KeyError):
        known = ", ".join(sorted(p.value for p in _CONFIG_CLASSES))
        raise ValueError(f"unknown peft_type {peft_type!r}; peftkit supports: {known}") from None


def config_from_dict(data: dict[str, Any]) -> PeftConfig:
    """Dispatch on ``data["peft_type"]`` to the right config class."""
    if "peft_type" not in data:
        raise ValueError("adapter config has no 'peft_type' key; is this an adapter_config.json?")
    return config_class(data["peft_type"]).from_dict(data)


def read_config(directory: str | os.PathLike) -> PeftConfig:
    """Read and parse ``<directory>/adapter_config.json`` with errors that name the file."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no {CONFIG_NAME} in {os.fspath(directory)!r}: pass the folder that "
            f"save_pretrained() wrote (it holds {CONFIG_NAME} and adapter_model.safetensors)"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}); the adapter folder is damaged"
        ) from exc
    return config_from_dict(data)
