"""Labelled record sets read from files that cannot run code: safetensors files or image folders.

A record file is a `.safetensors` file with two tensors:
  images  [N, C, H, W], uint8 (0..255) or float (16/32/64 bit, values in [0, 1])
  labels  [N], any integer type (int64 preferred), class indices >= 0
Other tensors in the file are ignored. An image folder holds one sub-folder per class
(`<root>/<class>/<image>`, read by poisonlab.data.image_folder); when every class folder is named
by a non-negative integer, that integer is the label ("0", "1", ..., "10"), otherwise the labels
follow the sorted folder names. Pickled formats (.pt, .pkl, .npy with objects) are refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from poisonlab.data.image_folder import load_image_folder
from poisonlab.data.types import ImageSet
from poisonlab.errors import DataError, require_regular_file

RECORD_SUFFIX = ".safetensors"
FORMAT_HINT = ("a .safetensors file with 'images' [N, C, H, W] and 'labels' [N], or an image "
               "folder with one sub-folder per class")


def load_records(path: str | Path) -> tuple[ImageSet, list[str] | None]:
    """Records of a file or folder: float32 images in [0, 1] with int64 labels, plus the class
    folder names of an image folder (None for a safetensors file)."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if not path.exists():
        raise DataError(f"record file {path} does not exist")
    if path.suffix.lower() != RECORD_SUFFIX:
        raise DataError(f"unsupported record file {path}: expected {FORMAT_HINT}")
    return _load_safetensors(path), None


def save_records(path: str | Path, records: ImageSet, dtype: torch.dtype = torch.uint8) -> Path:
    """Write records as a safetensors record file; uint8 (default) rounds images to 1/255."""
    if dtype not in (torch.uint8, torch.float16, torch.float32, torch.float64):
        raise DataError(f"record images are stored as uint8 or float, not {dtype}")
    x = records.x.detach().cpu()
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": images.contiguous(), "labels": records.y.detach().cpu().long()
               .contiguous()}, str(path))
    return path


def _load_safetensors(path: Path) -> ImageSet:
    try:
        require_regular_file(path)
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types, OSError and ValueError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read record file {path}: not a valid safetensors file "
                        f"({first})") from None
    missing = [k for k in ("images", "labels") if k not in tensors]
    if missing:
        found = ", ".join(sorted(tensors)) or "none"
        raise DataError(f"record file {path} has no '{missing[0]}' tensor (found: {found})")
    return ImageSet(_images(tensors["images"], path), _labels(tensors["labels"], tensors["images"],
                                                              path))


def _images(x: torch.Tensor, path: Path) -> torch.Tensor:
    if x.dim() != 4:
        raise DataError(f"'images' in {path} must be [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise DataError(f"record file {path} holds no images")
    if x.numel() == 0:
        raise DataError(f"'images' in {path} are empty: shape {tuple(x.shape)} (channels, "
                        "height and width must be positive)")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise DataError(f"'images' in {path} must be uint8 or float, got {x.dtype}")
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"'images' in {path} contain NaN or infinite values")
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        raise DataError(f"float 'images' in {path} must lie in [0, 1], found [{low:g}, {high:g}]")
    return x


def _labels(y: torch.Tensor, x: torch.Tensor, path: Path) -> torch.Tensor:
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise DataError(f"'labels' in {path} must be integers, got {y.dtype}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"'labels' in {path} must be [{x.shape[0]}] (one per image), got shape "
                        f"{tuple(y.shape)}")
    y = y.long()
    if int(y.min()) < 0:
        raise DataError(f"'labels' in {path} must be >= 0, found {int(y.min())}")
    return y


def _load_folder(root: Path) -> tuple[ImageSet, list[str]]:
    return load_image_folder(root)  # numbered folders are their labels (folder_labels)
