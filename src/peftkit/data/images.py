"""Image classification data: class-per-folder trees and MNIST's idx files.

``read_image_folder`` returns file paths (decoding is left to the image processor, which
reads lazily); ``read_idx`` returns uint8 arrays, since idx files are one binary blob.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .errors import DataFormatError, require_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# idx header byte 3 -> element type (all multi-byte types are big-endian).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_image_folder(
    root: str | Path, extensions: tuple[str, ...] = IMAGE_SUFFIXES
) -> list[dict[str, str]]:
    """List ``root/<class>/<image>`` files as ``[{"image": path, "label": class}, ...]``.

    Classes are the sub-folder names; records are sorted by class, then file name, so the
    order is the same on every machine. Files with other extensions are ignored.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        DataFormatError: no class folders, or no images in them.
    """
    r = Path(root).expanduser()
    if not r.is_dir():
        raise FileNotFoundError(
            f"image folder not found: {r}; expected a directory with one sub-folder per class."
        )
    classes = sorted(d for d in r.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataFormatError(
            r, None, "no class sub-folders; lay images out as <root>/<class>/<file>.jpg."
        )
    exts = tuple(e.lower() for e in extensions)
    records = [
        {"image": str(f), "label": d.name}
        for d in classes
        for f in sorted(d.iterdir())
        if f.is_file() and f.suffix.lower() in exts
    ]
    if not records:
        raise DataFormatError(r, None, f"no image files ({', '.join(exts)}) in the class folders.")
    return records


def read_image_files(
    root: str | Path, extensions: tuple[str, ...] = IMAGE_SUFFIXES
) -> list[dict[str, str]]:
    """A plain folder of images (no class sub-folders), sorted by name: ``[{"image": path}]``
    (DreamBooth's instance images; their caption comes from the task).

    Raises:
        DataFormatError: no image files in ``root``.
    """
    r = Path(root).expanduser()
    exts = tuple(e.lower() for e in extensions)
    records = [{"image": str(f)} for f in sorted(r.iterdir())
               if f.is_file() and f.suffix.lower() in exts]  # fmt: skip
    if not records:
        raise DataFormatError(r, None, f"no image files ({', '.join(exts)}) in the folder.")
    return records


def read_idx_array(path: str | Path) -> np.ndarray:
    """Decode one idx file (gzipped or not) into an array of the shape its header gives.

    idx layout: 2 zero bytes, a type byte, a byte with the number of dimensions ``d``, then
    ``d`` big-endian uint32 sizes, then the data in row-major order.
    """
    p = require_file(path, "idx file")
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFormatError(p, None, "not an idx file (bad magic number).")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(x) for x in np.frombuffer(raw[4:header], dtype=">u4"))
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - header != count * dtype.itemsize:
        raise DataFormatError(
            p, None, f"header says shape {shape} but the file holds {len(raw) - header} data bytes."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header, count=count).reshape(shape).copy()


def read_idx(images: str | Path, labels: str | Path | None = None) -> list[dict]:
    """Read MNIST-style idx files into ``[{"image": uint8 array (H, W), "label": int}, ...]``.

    Args:
        images: the idx3 images file, e.g. ``t10k-images-idx3-ubyte.gz``.
        labels: the idx1 labels file; without it records have no ``"label"``.

    Raises:
        DataFormatError: the two files disagree on the number of examples.
    """
    x = read_idx_array(images)  # (N, H, W)
    if labels is None:
        return [{"image": img} for img in x]
    y = read_idx_array(labels)  # (N,)
    if y.ndim != 1 or len(y) != len(x):
        raise DataFormatError(
            labels, None, f"{y.shape} labels do not match {len(x)} images in {images}."
        )
    return [{"image": img, "label": int(lab)} for img, lab in zip(x, y)]
