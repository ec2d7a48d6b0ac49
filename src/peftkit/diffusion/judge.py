"""A small image classifier that judges generated images: is this the prompted class?

::

    image (B, C, S, S) in [0, 1] ──conv 3x3 (32) → ReLU → max-pool 2──> (B, 32, S/2, S/2)
      ──conv 3x3 (64) → ReLU → max-pool 2──> (B, 64, S/4, S/4) ──flatten → Linear 128 → ReLU
      ──Linear──> logits (B, N) ──argmax──> label

Saved as a folder: ``config.json`` (``{"judge": "peftkit-cnn", channels, size, labels}``) and
``model.safetensors``. Trained on real images by the benchmark script (its held-out accuracy is
reported there), then named by ``task.classifier`` so each evaluation reports the share of
generated images it recognises as the prompted label.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

JUDGE_KIND = "peftkit-cnn"


class ImageJudge(nn.Module):
    """The CNN drawn in the module docstring."""

    def __init__(self, labels: Sequence[str], channels: int = 1, size: int = 32) -> None:
        super().__init__()
        if size % 4:
            raise ValueError(f"the judge's image side must be a multiple of 4, got {size}")
        self.labels, self.channels, self.size = [str(x) for x in labels], channels, size
        self.conv1 = nn.Conv2d(channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (size // 4) ** 2, 128)
        self.fc2 = nn.Linear(128, len(self.labels))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(images * 2 - 1)), 2)  # (B, 32, S/2, S/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 64, S/4, S/4)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))  # (B, N)

    @torch.no_grad()
    def classify(self, images: torch.Tensor, batch_size: int = 256) -> list[str]:
        """Labels of images (N, C, H, W) in [0, 1] (resized to the judge's side if needed)."""
        self.eval()
        device = next(self.parameters()).device
        out: list[str] = []
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device, torch.float32)
            if x.shape[-1] != self.size or x.shape[-2] != self.size:
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear")
            out += [self.labels[i] for i in self(x).argmax(-1).tolist()]
        return out

    def save(self, folder: str | Path) -> Path:
        """``config.json`` + ``model.safetensors`` in ``folder``, each written atomically."""
        from ..checkpoint import atomic_write_text, save_tensors

        folder = Path(folder)
        config = {"judge": JUDGE_KIND, "channels": self.channels, "size": self.size,
                  "labels": self.labels}  # fmt: skip
        atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
        save_tensors(folder / "model.safetensors", self.state_dict())
        return folder


def load_judge(folder: str | Path) -> ImageJudge:
    """The judge saved in ``folder``; FileNotFoundError / ValueError name the folder."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"task.classifier: {config_path} not found (a judge folder)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("judge") != JUDGE_KIND:
        raise ValueError(f"task.classifier: {config_path} is not a {JUDGE_KIND} judge")
    judge = ImageJudge(config["labels"], config["channels"], config["size"])
    judge.load_state_dict(load_file(str(folder / "model.safetensors")))
    return judge.eval()


__all__ = ["ImageJudge", "load_judge"]
