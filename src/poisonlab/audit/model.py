"""Loading a model you did not train: weights only (never unpickled), architecture by name,
number of classes and input channels read from the weights, input size from the user, the
file's metadata, the weights (for an architecture whose parameter shapes depend on it) or the
architecture's usual size.

Keys saved through a wrapper (`module.` from DataParallel/DDP, `model.` from a training module)
are matched to the architecture's before anything is read from them
(poisonlab.runs.checkpoints.match_key_names); a .pt dict holding the weights under
`state_dict`, `model_state_dict` or `model` is unwrapped by load_weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from poisonlab.errors import ConfigError, ModelFileError, printable
from poisonlab.models import build_model
from poisonlab.runs.checkpoints import load_into, load_weights, match_key_names

# Input size (H = W) an architecture is usually trained on, assumed when neither --image-size
# nor the model file says and the weights cannot tell (the model accepts other sizes too).
DEFAULT_SIZE = {"resnet": 32, "small_cnn": 28, "tiny_cnn": 28, "convnet_bn": 32}
# Architectures built for one input size (`build_model(..., image_size=N)`): their parameter
# shapes depend on it (convnet_bn's head sees widths[-1]·(N / 2^blocks)² features), so the
# sizes the weights fit are read back from them.
SIZED = ("convnet_bn",)
LARGEST_SIZE = 4096  # the largest input side (and channel count) a model file may declare,
# and the largest size looked for in the weights of a SIZED architecture
SHOWN_KEYS = 3  # keys an error lists

Shape = tuple[int, int, int]


class InputShape(tuple):
    """(C, H, W) a model expects (H = W = 0: any size), with how H and W were decided, so a
    mismatch can say what to do. basis: "given" (--image-size), "file" (the weights file's
    input_shape metadata), "weights" (a size the parameter shapes fit, the usual one when they
    fit it; `fits` is the (smallest, largest) size they fit), "default" (the architecture's
    usual size, which its weights do not fix) or "any"."""

    basis: str
    fits: tuple[int, int] | None

    def __new__(cls, shape: Sequence[int], basis: str = "given",
                fits: tuple[int, int] | None = None) -> InputShape:
        self = super().__new__(cls, tuple(int(v) for v in shape))
        self.basis, self.fits = basis, fits
        return self

    def explain(self, got: Sequence[int]) -> str:
        """Why the model expects this shape and how to change it, for images of (C, H, W)
        `got` that do not fit it: text to append to the error (starting with a space)."""
        c, h, w = self
        if got[0] != c:
            return f" (its first convolution takes {c}-channel images)"
        if tuple(got[1:]) == (h, w) or not h:
            return ""
        square = got[1] == got[2]
        flag = f"--image-size {got[1]}" if square else "--image-size N (square images only)"
        if self.basis == "default":
            return (f" (the architecture's usual size: its weights do not fix the input size; "
                    f"pass {flag} if the model takes {got[1]}x{got[2]} images)")
        if self.basis == "weights" and self.fits is not None:
            low, high = self.fits
            fit = f"its weights fit inputs of {low}x{low} to {high}x{high}"
            if square and low <= got[1] <= high:
                return f" ({fit}: pass {flag})"
            return f" ({fit} only: resize the images)"
        if self.basis == "file":
            return f" (the input_shape metadata of the model file; pass {flag} to override it)"
        return f" (--image-size {h})" if self.basis == "given" else ""


def load_model(path: Path | str, arch: str, *, in_channels: int | None = None,
               image_size: int | None = None) -> tuple[nn.Module, InputShape]:
    """Build `arch` and load the weights file `path` into it (safetensors, or
    torch.load(weights_only=True): never arbitrary code); returns the model in eval mode and the
    (C, H, W) it expects. The number of classes comes from the 2-D `head.weight`; the input
    channels from the weight of the architecture's first convolution (`in_channels`, else 3,
    when the file has none). H and W come from `image_size`, else the file's `input_shape`
    metadata, else (SIZED architectures) the usual size if the weights fit it or the smallest
    they fit, else the architecture's usual size (0, 0 when unknown: any size is accepted)."""
    path = Path(path)
    state, meta = load_weights(path)
    probe = _probe(arch)
    state = match_key_names(state, probe.state_dict())
    head = state.get("head.weight")
    if head is None or head.dim() != 2:
        raise ModelFileError(f"cannot tell the number of classes from {path}: it has no 2-D "
                             f"'head.weight' tensor, the {arch} classifier's head (its keys: "
                             f"{_few(sorted(state))}; {arch}'s: {_few(probe.state_dict())})")
    classes = head_classes(head, path)
    fixed = weight_channels(state, probe)
    channels = fixed or in_channels or 3
    shape = input_shape(arch, meta, image_size, channels, path, weights_fix_channels=bool(fixed))
    kwargs = {}
    if arch in SIZED:
        shape = _sized_shape(arch, shape, state, classes, path)
        kwargs["image_size"] = shape[1]
    model = build_model(arch, num_classes=classes, in_channels=channels, **kwargs)
    load_into(model, state, name=arch, source=str(path))
    return model.eval(), shape


def head_classes(head: torch.Tensor, path: Path | str) -> int:
    """The classes of a file's 2-D head weight; fewer than 2 is a ModelFileError naming the
    file (no classifier has one class: build_model would refuse it without naming the file)."""
    classes = int(head.shape[0])
    if classes < 2:
        raise ModelFileError(f"{path}: its 'head.weight' has {classes} output(s), but a "
                             "classifier has at least 2 classes")
    return classes


def input_shape(arch: str, meta: Mapping[str, str], image_size: int | None, channels: int,
                path: Path | str = "the model file", *,
                weights_fix_channels: bool = False) -> InputShape:
    """(C, H, W) the model expects: `image_size`, else the file's metadata, else the arch's
    usual size (DEFAULT_SIZE), else any size (H = W = 0). With `weights_fix_channels` (the
    weights' first convolution takes `channels`), metadata naming other channels is refused:
    the file contradicts itself, and the images are not to blame."""
    if image_size is not None:
        if not 1 <= image_size <= LARGEST_SIZE:
            raise ConfigError(f"--image-size must be 1 to {LARGEST_SIZE}, got {image_size}")
        return InputShape((channels, image_size, image_size), "given")
    if "input_shape" in meta:
        try:
            shape = json.loads(meta["input_shape"])
        except (ValueError, RecursionError):
            shape = None
        # exact integers only: [1.5, 28, 28] was read as [1, 28, 28], "abc" or {} ignored
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(type(v) is int and 1 <= v <= LARGEST_SIZE for v in shape)):
            raise ModelFileError(f"the input_shape metadata of {path} is "
                                 f"{printable(meta['input_shape'][:80])}, not [C, H, W] of "
                                 f"integers 1 to {LARGEST_SIZE} (pass --image-size to override "
                                 "it)")
        if weights_fix_channels and shape[0] != channels:
            raise ModelFileError(f"{path} contradicts itself: its input_shape metadata is "
                                 f"{shape}, but its first convolution takes {channels}-channel "
                                 "images (pass --image-size to override the metadata)")
        return InputShape(tuple(shape), "file")
    for prefix, size in DEFAULT_SIZE.items():
        if arch.startswith(prefix):
            return InputShape((channels, size, size), "default")
    return InputShape((channels, 0, 0), "any")  # unknown: accept the data's size


def model_channels(model: nn.Module) -> int:
    """Input channels of the model's first convolution (3 without one)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return int(conv.in_channels) if conv is not None else 3


def weight_channels(state: Mapping[str, torch.Tensor], probe: nn.Module) -> int | None:
    """Input channels of the file's weight for the architecture's first convolution (`probe`
    is the architecture); None when the architecture has none or the file lacks it. The
    first 4-D tensor of a file need not be that weight: safetensors lists names in order."""
    name = next((n for n, m in probe.named_modules() if isinstance(m, nn.Conv2d)), None)
    weight = state.get(f"{name}.weight") if name is not None else None
    return int(weight.shape[1]) if weight is not None and weight.dim() == 4 else None


def _probe(arch: str, **kwargs) -> nn.Module:
    """`arch` on the meta device (parameter names and shapes, no memory, no initialisation
    cost): what the weights are compared with."""
    with torch.device("meta"):
        return build_model(arch, num_classes=kwargs.pop("num_classes", 2),
                           in_channels=kwargs.pop("in_channels", 3), **kwargs)


def _few(keys: Mapping | Sequence) -> str:
    names = list(keys)
    more = f", ... ({len(names)} in all)" if len(names) > SHOWN_KEYS else ""
    return ", ".join(names[:SHOWN_KEYS]) + more if names else "none"


def _sized_shape(arch: str, shape: InputShape, state: Mapping[str, torch.Tensor],
                 classes: int, path: Path) -> InputShape:
    """`shape` for a SIZED architecture: a given or recorded size checked against the sizes
    the weights fit; otherwise the architecture's usual size when they fit it, else the
    smallest they fit. The weights fitting no size are left to load_into to describe."""
    fits = fitting_sizes(arch, state, classes, shape[0])
    if fits is None:
        return shape
    low, high = fits
    size = shape[1]
    if shape.basis in ("given", "file"):
        if not low <= size <= high:
            what = (f"--image-size {size}" if shape.basis == "given"
                    else f"the {size}x{size} of its input_shape metadata")
            raise ModelFileError(f"the weights in {path} fit {arch} inputs of {low}x{low} to "
                                 f"{high}x{high}, not {what}")
        return shape
    size = size if shape.basis == "default" and low <= size <= high else low
    return InputShape((shape[0], size, size), "weights", fits)


def fitting_sizes(arch: str, state: Mapping[str, torch.Tensor], classes: int,
                  channels: int) -> tuple[int, int] | None:
    """(smallest, largest) input size at which SIZED architecture `arch` has the parameter
    shapes of `state` (None when no size up to LARGEST_SIZE gives them). Its parameter count
    grows with the size, so both ends are found by bisection on it."""
    want = {k: tuple(v.shape) for k, v in state.items()}

    def count(size: int) -> int:
        try:
            model = _probe(arch, num_classes=classes, in_channels=channels, image_size=size)
        except ConfigError:  # too small for the architecture
            return -1
        return sum(p.numel() for p in model.state_dict().values())

    def fits(size: int) -> bool:
        model = _probe(arch, num_classes=classes, in_channels=channels, image_size=size)
        return all(want.get(k) == tuple(v.shape) for k, v in model.state_dict().items())

    target = sum(state[k].numel() for k in _probe(arch, num_classes=classes,
                                                  in_channels=channels).state_dict()
                 if k in state)
    low = _first(lambda s: count(s) >= target, 1, LARGEST_SIZE)
    if low is None or not fits(low):
        return None
    after = _first(lambda s: count(s) > target, low, LARGEST_SIZE)
    return low, (after - 1 if after is not None else LARGEST_SIZE)


def _first(condition, low: int, high: int) -> int | None:
    """The smallest n in [low, high] where the monotone `condition` holds (None if nowhere)."""
    if not condition(high):
        return None
    while low < high:
        middle = (low + high) // 2
        if condition(middle):
            high = middle
        else:
            low = middle + 1
    return low
