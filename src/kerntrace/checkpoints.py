"""Loading checkpoints into a model, and fingerprinting them."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointFormatError

__all__ = ["load_state_dict", "load_into", "fingerprint", "ACCEPTED"]

ACCEPTED = (
    "a state dict (mapping of names to tensors), an nn.Module, a path to a "
    "'.pt'/'.pth' file saved with torch.save, or a path to a '.safetensors' file"
)


def load_state_dict(checkpoint: Any) -> Mapping[str, Tensor]:
    """Turn any accepted checkpoint into a state dict.

    Args:
        checkpoint: See ``ACCEPTED``. A ``.pt`` file may hold a state dict
            directly or under the key ``"state_dict"`` or ``"model"``.

    Raises:
        CheckpointFormatError: The checkpoint is of none of those formats.
        FileNotFoundError: The path does not exist.
    """
    if isinstance(checkpoint, nn.Module):
        return checkpoint.state_dict()
    if isinstance(checkpoint, str | os.PathLike):
        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
        if path.is_dir():
            raise CheckpointFormatError(
                f"checkpoint {str(path)!r} is a directory; accepted are {ACCEPTED}"
            )
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                return load_file(str(path))
            except Exception as error:
                raise CheckpointFormatError(
                    f"checkpoint file {str(path)!r} cannot be read as safetensors "
                    f"({type(error).__name__}: {error}); it is truncated or not a "
                    "safetensors file: save it again with safetensors.torch.save_file"
                ) from error
        if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:
                raise CheckpointFormatError(
                    f"checkpoint file {str(path)!r} cannot be loaded with "
                    f"torch.load(weights_only=True) ({type(error).__name__}: "
                    f"{_first_line(error)}); save model.state_dict() with "
                    "torch.save rather than the whole model, or check that the "
                    "file is complete"
                ) from error
            return load_state_dict(_unwrap(loaded, path))
        raise CheckpointFormatError(
            f"checkpoint file {str(path)!r} has suffix {path.suffix!r}; accepted "
            f"are {ACCEPTED}"
        )
    if isinstance(checkpoint, Mapping):
        bad = [k for k, v in checkpoint.items() if not isinstance(v, Tensor)]
        if not bad:
            return checkpoint
        unwrapped = _unwrap(checkpoint, None)
        if unwrapped is not checkpoint:
            return load_state_dict(unwrapped)
        raise CheckpointFormatError(
            f"checkpoint mapping has non-tensor values under {bad[:5]}; accepted "
            f"are {ACCEPTED}"
        )
    raise CheckpointFormatError(
        f"checkpoint of type {type(checkpoint).__name__} is not accepted; "
        f"accepted are {ACCEPTED}"
    )


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _unwrap(loaded: Any, path: Path | None) -> Any:
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(loaded.get(key), Mapping):
                return loaded[key]
    return loaded


def load_into(model: nn.Module, checkpoint: Any) -> None:
    """Load a checkpoint into ``model`` in place (strictly: all keys match).

    Raises:
        CheckpointFormatError: The keys or shapes do not fit the model.
    """
    state = load_state_dict(checkpoint)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointFormatError(
            f"the checkpoint does not fit the model ({error}); pass a checkpoint "
            "of this model's architecture: its names and shapes must be those "
            "of model.state_dict()"
        ) from error


def fingerprint(model: nn.Module, names: tuple[str, ...]) -> str:
    """A SHA-256 of the named parameters' values, shapes and dtypes (16 hex)."""
    digest = hashlib.sha256()
    params = dict(model.named_parameters())
    for name in names:
        value = params[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{list(value.shape)}:{value.dtype}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
