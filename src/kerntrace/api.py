"""The user-facing workflow: ``TRAKer`` step by step, ``attribute`` in one call.

``TRAKer`` keeps the call sequence of the ``traker`` package (load a
checkpoint, featurize train batches, finalize features, then per checkpoint
start scoring, score target batches, finalize scores). Each step checks that
the steps it depends on have run, and names the missing one if not.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed, kernel, outputs
from .checkpoints import fingerprint, load_into
from .errors import (
    BatchError,
    ConfigurationError,
    KerntraceError,
    NumericalError,
    OrderError,
    PrecisionWarning,
    StoreCorruptError,
    StoreMismatchError,
)
from .factorized import FactorizedProjector, factorized_share
from .featurize import Featurizer
from .files import format_bytes
from .gradients import batch_items, batch_size, select_parameters
from .heap import release_freed_blocks
from .outputs import Task, get_task
from .projection import PROJECTORS, Projector, make_projector
from .scoring import Audit, Scores, ensemble_scores, self_scores
from .store import Store, TrainWriter, format_rows, new_array, save_array

__all__ = ["TRAKer", "attribute", "audit", "DEFAULT_PROJ_DIM"]

logger = logging.getLogger(__name__)

DEFAULT_PROJ_DIM = 2048
_FEATURE_DTYPES = ("float16", "float32", "float64")
# Modules whose output differs between train and eval mode.
_MODE_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


@dataclass
class _Scoring:
    exp_name: str
    model_id: int
    num_targets: int
    featurizer: Featurizer
    cursor: int = 0


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigurationError(
            f"device {device!r} is not a torch device; use e.g. 'cpu' or 'cuda:0'"
        ) from error
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index or 0) >= count:
            raise ConfigurationError(
                f"device {device!r} was asked for, but this machine has {count} "
                "CUDA device(s) available to torch; use device='cpu' or one of "
                "the CUDA devices it has"
            )
    return resolved


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | np.integer)


def _positive_int(value: Any, name: str) -> int:
    if not _is_int(value):
        raise ConfigurationError(
            f"{name} must be a positive integer, got {value!r} ({type(value).__name__})"
        )
    if value < 1:
        raise ConfigurationError(f"{name} must be a positive integer, got {value}")
    return int(value)


def _physical_memory() -> int | None:
    """The machine's physical memory in bytes; ``None`` where unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _free_disk(path: Path) -> int | None:
    """Free bytes on the file system that holds ``path`` or its nearest parent."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _check_sizes(k: int, n: int, itemsize: int, save_dir: Path) -> None:
    """Refuse a proj_dim whose kernel or train features cannot fit.

    The (k, k) float64 kernel must take at most half the physical memory;
    the (n, k) train features of a new store at most the free disk space.

    Raises:
        ConfigurationError: Either would not fit; the message suggests a
            proj_dim that does.
    """
    memory = _physical_memory()
    disk = None if (save_dir / "store.json").exists() else _free_disk(save_dir)
    limits = []
    if memory is not None:
        limits.append(
            (
                8 * k * k,
                memory // 2,
                "the (k, k) float64 kernel",
                "half the physical memory",
                math.isqrt(memory // 16),
            )
        )
    if disk is not None:
        limits.append(
            (
                n * k * itemsize,
                disk,
                f"the ({n}, k) train features of one checkpoint",
                f"the free disk space at {str(save_dir)!r}",
                disk // (n * itemsize),
            )
        )
    for needed, limit, what, where, largest in limits:
        if needed > limit:
            fitting = min(largest for *_, largest in limits)
            hint = (
                f"use proj_dim={2 ** (fitting.bit_length() - 1)} or smaller"
                if fitting >= 1
                else "free disk space or memory"
            )
            raise ConfigurationError(
                f"proj_dim={k} is too large: {what} would need "
                f"{format_bytes(needed)}, more than {where} "
                f"({format_bytes(limit)}); {hint}"
            )


def _model_id(value: Any) -> int:
    if not _is_int(value):
        raise ConfigurationError(
            f"model_id must be a non-negative integer, got {value!r} "
            f"({type(value).__name__}); number the checkpoints 0, 1, 2, ..."
        )
    if value < 0:
        raise ConfigurationError(f"model_id must be ≥ 0, got {value}")
    return int(value)


def _model_ids(value: Any) -> list[int] | None:
    """``None``, or a list of distinct model ids from a sequence of integers."""
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ConfigurationError(
            f"model_ids must be None or a list of model ids, got {value!r}; pass "
            "e.g. model_ids=[0, 2]"
        )
    ids = [_model_id(i) for i in value]
    if not ids:
        raise ConfigurationError(
            "model_ids is empty; pass None for every model id, or name some"
        )
    if len(set(ids)) != len(ids):
        raise ConfigurationError(
            f"model_ids holds duplicates ({ids}); name each checkpoint once"
        )
    return ids


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise ConfigurationError(
            f"{name} must be True or False, got {value!r} ({type(value).__name__})"
        )
    return bool(value)


def _damping(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ConfigurationError(
            f"lambda_reg must be None (automatic) or a number ≥ 0, got {value!r} "
            f"({type(value).__name__})"
        )
    if not (np.isfinite(value) and value >= 0):
        raise ConfigurationError(
            f"lambda_reg must be None (automatic) or a finite number ≥ 0, got "
            f"{value!r}; leave it None to choose the damping from the features"
        )
    return float(value)


def _rows_of(
    inds: Any, num_samples: int | None, count: int, cursor: int, total: int
) -> np.ndarray:
    """Validate ``inds`` / ``num_samples`` and return the batch's row indices."""
    if (inds is None) == (num_samples is None):
        raise BatchError(
            "pass exactly one of inds= (the examples' indices) or num_samples= "
            "(the batch size, for batches given in order)"
        )
    if num_samples is not None:
        if not _is_int(num_samples) or num_samples < 0:
            raise BatchError(
                f"num_samples must be a non-negative integer, got {num_samples!r} "
                f"({type(num_samples).__name__}); pass num_samples=len(batch[0])"
            )
        if num_samples != count:
            raise BatchError(
                f"num_samples={num_samples} but the batch holds {count} examples; "
                "pass num_samples=len(batch[0])"
            )
        if cursor + count > total:
            raise BatchError(
                f"rows {cursor}..{cursor + count - 1} go past the {total} examples "
                "declared; more examples were fed than declared, or a loop ran "
                "twice: call load_checkpoint / start_scoring_checkpoint again to "
                "restart at row 0, or pass inds="
            )
        return np.arange(cursor, cursor + count, dtype=np.int64)
    if isinstance(inds, set | frozenset | Mapping):
        raise BatchError(
            f"inds must be an ordered sequence (list, range, array or tensor), got "
            f"a {type(inds).__name__}, whose order need not match the batch's rows"
        )
    if isinstance(inds, torch.Tensor):
        inds = inds.detach().cpu().numpy()
    elif isinstance(inds, Iterable) and not isinstance(inds, np.ndarray | str | bytes):
        inds = list(inds)
    try:
        rows = np.asarray(inds)
    except ValueError as error:
        raise BatchError(
            f"inds must be a 1-d sequence of integers; it could not be read as "
            f"an array ({error})"
        ) from error
    if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
        raise BatchError(
            f"inds must be a 1-d sequence of integers, got shape {rows.shape} "
            f"and dtype {rows.dtype}; pass e.g. inds=range(start, stop)"
        )
    if rows.size and rows.dtype.kind == "u" and rows.max() > np.iinfo(np.int64).max:
        raise BatchError(
            f"inds must lie in 0..{total - 1}, got values up to {rows.max()}"
        )
    rows = rows.astype(np.int64)
    if rows.shape[0] != count:
        raise BatchError(
            f"inds has {rows.shape[0]} entries but the batch holds {count} "
            "examples; pass one index per example of the batch"
        )
    if rows.size and (rows.min() < 0 or rows.max() >= total):
        raise BatchError(
            f"inds must lie in 0..{total - 1}, got values from {rows.min()} to "
            f"{rows.max()}; index the examples from 0, within the size declared"
        )
    values, counts = np.unique(rows, return_counts=True)
    if values.size != rows.size:
        twice = values[counts > 1][:5].tolist()
        raise BatchError(
            f"inds holds duplicates ({twice}); each example must appear once in a batch"
        )
    return rows


class TRAKer:
    """Attributes a model's outputs on targets to its train examples (TRAK).

    A model in train mode is accepted: gradients and outputs are always
    computed in eval mode, so BatchNorm uses its running statistics and
    Dropout is off (TRAK attributes the deterministic function the model
    computes at inference), and afterwards every module gets back the mode
    it had. This is logged once at INFO. A BatchNorm without running
    statistics, which couples the examples of a batch even in eval mode, is
    refused with ``ModelModeError``.

    Every argument is checked here, and every batch and index argument when
    it is passed, before any work is done or anything is written; a bad one
    raises a subclass of ``KerntraceError`` (see ``kerntrace.errors``) that
    names the argument, the value seen and what to do.

    Args:
        model: The network. It is moved to ``device``; its mode and buffers
            are left as they were. Batches are moved to the device of its
            first parameter, and their floating tensors cast to its dtype.
        task: A task name (see ``kerntrace.outputs.TASKS``) or a task object.
        train_set_size: n, the number of train examples.
        save_dir: The store directory; an existing store is reopened and must
            have been made with the same settings.
        proj_dim: k, the number of features per example. ``None`` takes
            2048, or the number of parameters p if that is smaller.
        projector: ``"auto"`` (default) takes ``"identity"`` (the exact
            gradients, k = p) when ``proj_dim`` is at least the number of
            parameters p, else ``"factorized"`` when at least half of the
            selected parameters sit in Linear, Conv2d or Embedding layers,
            else ``"dense"``, or ``"sparse"`` when a dense matrix would pass
            1 GiB, and logs its choice. ``"factorized"`` projects
            layer by layer from hooks' captures, never forming the
            p-dimensional gradient; ``"dense"`` (Gaussian), ``"rademacher"``,
            ``"sparse"`` (sparse JL) and ``"identity"`` (no projection)
            project per-example gradient vectors.
        projector_seed: Seed of the random projection.
        lambda_reg: The damping λ of the kernel ΦᵀRΦ + λI, R the loss
            curvature of each train example (``outputs.curvature``). ``None``
            chooses it per checkpoint as 0.2 times the mean weighted squared
            feature norm, tr(ΦᵀRΦ)/n (see ``kernel.choose_damping``), and
            logs it; a number is used as given.
        curvature: Weight each train example in the kernel by its loss
            curvature R (the Gauss–Newton ΦᵀRΦ, the default); ``False``
            forms the plain ΦᵀΦ, as ``traker`` does.
        grad_wrt: Parameter or module names to differentiate; ``None`` takes
            every parameter with ``requires_grad=True``.
        use_half_precision: Store features in float16 (the solve stays in
            float64). A feature beyond float16's range (|φ| > 65504) is an
            error before anything is written; rows whose features are too
            small for float16 warn with ``PrecisionWarning``.
        feature_dtype: Overrides the storage dtype: ``"float16"``,
            ``"float32"`` (default) or ``"float64"``; recorded in
            ``store.json``.
        device: Where gradients are computed; default CUDA if available.
        memory_bytes: Budget for one chunk of a batch: its per-example
            gradients, and with the factorized projector the batched pass's
            activations (measured on the first batch).
        rank: With ``world_size``, this process featurizes only the train
            rows ``kerntrace.shard(train_set_size, rank, world_size)``,
            skipping the others it is fed, and writes them to its own shard
            files. ``None`` takes both from torch.distributed when it is
            initialised (then ``finalize_features`` is collective), else this
            process featurizes every row.
        world_size: The number of processes featurizing the train set.

    Raises:
        ConfigurationError: An argument has an unusable value (the message
            names it), e.g. an unknown task, a ``grad_wrt`` name the model
            lacks (the valid ones are listed), a frozen model, a CUDA device
            this machine lacks.
        StoreMismatchError: ``save_dir`` holds a store made with other
            settings.
    """

    def __init__(
        self,
        model: nn.Module,
        task: str | Task,
        train_set_size: int,
        save_dir: str | os.PathLike[str] = "./trak_results",
        *,
        proj_dim: int | None = None,
        projector: str = "auto",
        projector_seed: int = 0,
        lambda_reg: float | None = None,
        curvature: bool = True,
        grad_wrt: Sequence[str] | str | None = None,
        use_half_precision: bool = False,
        feature_dtype: str | None = None,
        device: str | torch.device | None = None,
        memory_bytes: int = 256 << 20,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigurationError(
                f"model must be a torch.nn.Module, got {type(model).__name__}"
            )
        self.train_set_size = _positive_int(train_set_size, "train_set_size")
        if proj_dim is not None:
            _positive_int(proj_dim, "proj_dim")
        lambda_reg = _damping(lambda_reg)
        use_half_precision = _flag(use_half_precision, "use_half_precision")
        if feature_dtype is not None and not isinstance(feature_dtype, str):
            raise ConfigurationError(
                f"feature_dtype must be a name, one of {_FEATURE_DTYPES}, got "
                f"{feature_dtype!r}"
            )
        dtype = feature_dtype or ("float16" if use_half_precision else "float32")
        if dtype not in _FEATURE_DTYPES:
            raise ConfigurationError(
                f"feature_dtype must be one of {_FEATURE_DTYPES}, got {dtype!r}"
            )
        if not _is_int(projector_seed) or projector_seed < 0:
            raise ConfigurationError(
                f"projector_seed must be an integer ≥ 0, got {projector_seed!r}"
            )
        memory_bytes = _positive_int(memory_bytes, "memory_bytes")
        if not isinstance(save_dir, str | os.PathLike):
            raise ConfigurationError(
                f"save_dir must be a path (str or os.PathLike), got "
                f"{type(save_dir).__name__}"
            )
        self.rank, self.world_size, self._collective = distributed.resolve(
            rank, world_size
        )
        self.shard = distributed.shard(self.train_set_size, self.rank, self.world_size)
        self.device = _resolve_device(device)
        self.task = get_task(task)
        self.layout = select_parameters(model, grad_wrt)
        self.model = model.to(self.device)
        self.projector_seed = int(projector_seed)
        self.lambda_reg = None if lambda_reg is None else float(lambda_reg)
        self.curvature = bool(curvature)
        self.memory_bytes = memory_bytes
        kinds = (*PROJECTORS, "factorized", "auto")
        if not isinstance(projector, str) or projector not in kinds:
            raise ConfigurationError(
                f"unknown projector {projector!r}; use one of {', '.join(kinds)}"
            )
        if projector == "identity":
            self.proj_dim = self.layout.numel
        elif proj_dim is None:
            self.proj_dim = min(DEFAULT_PROJ_DIM, self.layout.numel)
        else:
            self.proj_dim = int(proj_dim)
        if projector == "auto" and self.proj_dim >= self.layout.numel:
            logger.info(
                "projector 'auto' chose 'identity': proj_dim=%d is at least the "
                "%d parameters, so the exact per-example gradients are the "
                "features (k=%d); a random projection would only distort them",
                self.proj_dim,
                self.layout.numel,
                self.layout.numel,
            )
            projector, self.proj_dim = "identity", self.layout.numel
        self._described = False
        projector = self._choose_projector(projector)
        self.projector_kind = projector
        if self.lambda_reg == 0 and self.proj_dim >= self.train_set_size:
            warnings.warn(
                f"lambda_reg=0 with proj_dim={self.proj_dim} ≥ train_set_size="
                f"{self.train_set_size}: the kernel ΦᵀRΦ is singular and the "
                "scores would be noise; leave lambda_reg=None to choose the "
                "damping automatically",
                kernel.IllConditionedWarning,
                stacklevel=2,
            )
        _check_sizes(
            self.proj_dim,
            self.train_set_size,
            np.dtype(dtype).itemsize,
            Path(save_dir),
        )
        self.store = Store(
            save_dir,
            {
                "task": self.task.name,
                "train_set_size": self.train_set_size,
                "proj_dim": self.proj_dim,
                "projector": projector,
                "projector_seed": self.projector_seed,
                "feature_dtype": dtype,
                "parameters": list(self.layout.names),
                "parameter_layout": self.layout.fingerprint(),
                "num_parameters": self.layout.numel,
            },
        )
        self.save_dir = self.store.path
        self._model_id: int | None = None
        self._featurizer: Featurizer | None = None
        self._writer: TrainWriter | None = None
        self._cursor = 0
        self._scoring: _Scoring | None = None
        self._mode_noted = False
        logger.info(
            "TRAKer: task %s, %d train examples, %d parameters in %d tensors, "
            "projector %s with k=%d and seed %d, features stored as %s, on %s",
            self.task.name,
            self.train_set_size,
            self.layout.numel,
            len(self.layout.names),
            projector,
            self.proj_dim,
            self.projector_seed,
            dtype,
            self.device,
        )
        if self.world_size > 1:
            logger.info(
                "rank %d of %d featurizes train rows %d..%d",
                self.rank,
                self.world_size,
                self.shard.start,
                self.shard.stop - 1,
            )

    # -- featurizing ------------------------------------------------------

    def _choose_projector(self, requested: str) -> str:
        if requested != "auto":
            return requested
        share = factorized_share(self.model, self.layout)
        dense_bytes = 4 * self.layout.numel * self.proj_dim
        if share >= 0.5:
            chosen = "factorized"
        elif dense_bytes > 1 << 30:
            chosen = "sparse"
        else:
            chosen = "dense"
        logger.info(
            "projector 'auto' chose %r: %.0f%% of the parameters are in Linear, "
            "Conv2d or Embedding layers, a dense matrix would take %s",
            chosen,
            100 * share,
            format_bytes(dense_bytes),
        )
        return chosen

    def _projector(self, model_id: int) -> Projector | FactorizedProjector:
        if self.projector_kind == "factorized":
            projector = FactorizedProjector(
                self.model,
                self.layout,
                self.proj_dim,
                seed=self.projector_seed,
                model_id=model_id,
            )
            if not self._described:
                self._described = True
                logger.info("factorized projection: %s", projector.describe())
            return projector
        return make_projector(
            self.projector_kind,
            self.layout.numel,
            self.proj_dim,
            seed=self.projector_seed,
            model_id=model_id,
        )

    def _load(self, checkpoint: Any, model_id: int) -> str:
        _model_id(model_id)
        load_into(self.model, checkpoint)
        self._note_train_mode()
        return fingerprint(self.model, self.layout.names)

    def _note_train_mode(self) -> None:
        """Say once, at INFO, that a model in train mode is run in eval mode."""
        if self._mode_noted or not any(m.training for m in self.model.modules()):
            return
        self._mode_noted = True
        affected = [
            name or type(module).__name__
            for name, module in self.model.named_modules()
            if module.training and isinstance(module, _MODE_DEPENDENT)
        ]
        shown = ", ".join(affected[:5]) + (" ..." if len(affected) > 5 else "")
        logger.info(
            "the model is in train mode; gradients are computed in eval mode "
            "(BatchNorm uses its running statistics, Dropout is off), and each "
            "module's mode is restored afterwards%s",
            f"; modules that act differently in train mode: {shown}"
            if affected
            else "",
        )

    def load_checkpoint(self, checkpoint: Any, model_id: int) -> None:
        """Load checkpoint ``model_id`` into the model to featurize with it.

        Args:
            checkpoint: A state dict, module, ``.pt`` or ``.safetensors`` path.
            model_id: The checkpoint's id, an integer ≥ 0.

        Raises:
            StoreMismatchError: The store already has features of another
                checkpoint under this id.
            StoreBusyError: Another live process is featurizing rows of this
                id that this one would write.
        """
        stamp = self._load(checkpoint, model_id)
        self._release()
        featurizer = Featurizer(
            self.model,
            self.task,
            self.layout,
            self._projector(int(model_id)),
            memory_bytes=self.memory_bytes,
        )
        self._writer = self._claim(int(model_id), stamp)
        self._model_id = int(model_id)
        self._featurizer = featurizer
        self._cursor = 0
        self._scoring = None
        logger.info("loaded checkpoint %d (fingerprint %s)", model_id, stamp)

    def _claim(self, model_id: int, stamp: str) -> TrainWriter:
        """Record the checkpoint's fingerprint and claim this process's rows.

        A recorded fingerprint may be replaced while no row of the id is
        written or claimed by another process.
        """
        relative = f"models/{model_id}/checkpoint.json"
        with self.store.model_lock(model_id):
            recorded = self.store.read(relative)
            if recorded is not None and recorded["fingerprint"] != stamp:
                others = [c for c in self.store.claims(model_id) if not c.mine()]
                if self.store.rows_done(model_id) == 0 and not others:
                    recorded = None
            if recorded is not None and recorded["fingerprint"] != stamp:
                raise StoreMismatchError(
                    f"model id {model_id} in {str(self.save_dir)!r} was featurized "
                    f"with another checkpoint (fingerprint "
                    f"{recorded['fingerprint']}, this one {stamp}); use a new "
                    "model_id or a new save_dir"
                )
            if recorded is None:
                self.store.write(relative, {"fingerprint": stamp})
            return self.store.writer(model_id, self.shard.start, self.shard.stop)

    def featurize(
        self,
        batch: Any,
        inds: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        num_samples: int | None = None,
    ) -> None:
        """Compute and store the features of a batch of train examples.

        Rows already in the store are skipped, so rerunning a loop after a
        crash only computes what is missing; so are rows outside this
        process's shard (see ``rank`` and ``world_size``). The rows are
        written to the store in the background while the next batch is
        computed (see ``flush``); a process killed meanwhile computes them
        again.

        Args:
            batch: Tuple, list or dict of tensors, first dimension B.
            inds: The B examples' indices in the train set: distinct
                integers in 0..n-1 (list, range, array or tensor).
            num_samples: B, for batches fed in train-set order.

        Raises:
            OrderError: No checkpoint was loaded.
            BatchError: The batch or ``inds`` / ``num_samples`` is malformed
                (checked before any work), or the model fails on the batch's
                dtype or device.
            NonFiniteGradientError: An example's gradient is NaN or infinite.
            NumericalError: Features overflow float16 storage.
            StoreWriteError: An earlier batch's rows could not be written;
                the message names them, they stay missing (rerunning the loop
                computes them) and this batch's rows were handed on.
        """
        if self._featurizer is None or self._writer is None:
            raise OrderError(
                "featurize() needs a checkpoint: call load_checkpoint(checkpoint, "
                "model_id) first"
            )
        count = batch_size(batch)
        rows = _rows_of(inds, num_samples, count, self._cursor, self.train_set_size)
        todo = self._writer.pending(rows)
        if todo.size:
            self._writer.ensure_claim()
            part = batch if todo.size == count else _take(batch, todo)
            with _explain_placement(part, self._featurizer):
                features, weights = self._featurizer(part, rows[todo])
            features = _storable(features.numpy(), self.store.feature_dtype, rows[todo])
            self.store.remove(f"models/{self._model_id}/kernel.json")
        if num_samples is not None:
            # These rows are taken from here on, even if an earlier batch's
            # write failure is raised below: this batch's rows are handed on.
            self._cursor += count
        if todo.size:
            self._writer.write(rows[todo], features, weights.numpy())

    def flush(self) -> None:
        """Write the train rows featurized so far to disk and mark them done.

        ``featurize`` returns while its rows are still being copied to the
        store and flushed in the background (at most once a second), so that
        this overlaps with the next batch. ``load_checkpoint``,
        ``start_scoring_checkpoint``, ``finalize_features`` and the end of
        the process flush too; call this to read the store's files while the
        TRAKer is still featurizing.

        Raises:
            StoreWriteError: The rows cannot be written; they stay missing.
        """
        if self._writer is not None:
            self._writer.sync()

    def _release(self) -> None:
        """Let other processes claim this one's rows; ``featurize`` reclaims them.

        Also hands the heap's free pages back to the system (``heap``).
        """
        if self._writer is not None:
            self._writer.release()
        release_freed_blocks()

    def finalize_features(
        self, model_ids: Sequence[int] | None = None, del_grads: bool = False
    ) -> None:
        """Form, damp and factor the kernel of each featurized checkpoint.

        Running it again is harmless: a kernel already made from the same
        features and damping setting is kept. Rows featurized by several
        processes are first merged from their shard files.

        With a torch.distributed group (see ``rank``) every rank must call it:
        it waits for all ranks, then each rank finalizes every W-th
        checkpoint, and all ranks raise if one fails.

        Args:
            model_ids: Checkpoints to finalize; default every one in the store.
            del_grads: Accepted for compatibility with ``traker``; ignored.

        Raises:
            OrderError: No checkpoint was featurized, or some rows of one are
                missing; the message names them, and any process still
                writing them.
        """
        self._release()
        if self._collective:
            distributed.barrier()
        ids = _model_ids(model_ids)
        ids = ids if ids is not None else self.store.model_ids()
        mine = ids[self.rank :: self.world_size] if self._collective else ids
        failure = None
        try:
            if not ids:
                raise OrderError(
                    "finalize_features() found no features: call load_checkpoint() "
                    "and featurize() on the train set first"
                )
            for model_id in mine:
                self._finalize_model(int(model_id))
        except Exception as error:
            if not self._collective:
                raise
            failure = error
        if self._collective:
            failure = distributed.first_error(failure)
            if failure is not None:
                raise failure

    @property
    def _kernel_form(self) -> str:
        return kernel.WEIGHTED if self.curvature else kernel.PLAIN

    def _finalize_model(self, model_id: int) -> None:
        relative = f"models/{model_id}/kernel.json"
        if model_id not in self.store.model_ids():
            raise OrderError(
                f"model id {model_id} has no features in {str(self.save_dir)!r}; "
                "call load_checkpoint(..., model_id) and featurize() first"
            )
        arrays, busy = self.store.gather(model_id)
        if arrays.missing().size:
            n = self.train_set_size
            missing = np.flatnonzero(~self.store.done_mask(model_id, 0, n))
            others = "; ".join(c.describe() for c in busy if not c.mine())
            raise OrderError(
                f"model id {model_id} has {missing.size} of {self.train_set_size} "
                f"train rows not featurized (first missing: {missing[0]}); "
                f"featurize them before finalize_features(): rows "
                f"{format_rows(missing)} are missing"
                + (f"; another process is still writing {others}" if others else "")
            )
        recorded = self.store.read(relative)
        if (
            recorded is not None
            and recorded.get("lambda_reg") == self.lambda_reg
            and recorded.get("form") == self._kernel_form
            and self._factor_readable(model_id)
        ):
            logger.info("model id %d: kernel already finalized, kept", model_id)
            return
        # Unmark it first: a crash between the two writes below must not pair
        # the old damping's record with the new factor.
        self.store.remove(relative)
        weights = (
            outputs.curvature(self.task, arrays.weights) if self.curvature else None
        )
        gram, form = kernel.form(arrays.features, weights)
        if self.lambda_reg is None:
            damping = kernel.choose_damping(gram, self.train_set_size)
        else:
            damping = kernel.Damping(self.lambda_reg, "given")
        lower = kernel.factor(gram, damping.value, n=self.train_set_size)
        save_array(self.store.model_dir(model_id) / "cholesky.npy", lower)
        self.store.write(
            relative,
            {
                "form": self._kernel_form,
                "formed": form,
                "lambda_reg": self.lambda_reg,
                "damping": damping.value,
                "rule": damping.rule,
                "trace": float(np.trace(gram)),
            },
        )
        logger.info(
            "model id %d: damping λ=%.4g (%s), %s kernel of size %d factored",
            model_id,
            damping.value,
            damping.rule,
            form,
            self.proj_dim,
        )

    # -- self-influence ---------------------------------------------------

    def self_scores(self, model_ids: Sequence[int] | None = None) -> np.ndarray:
        """Self-influence τ(z_i, z_i) of every train example.

        It averages φ_m(z_i)ᵀ K_m⁻¹ φ_m(z_i), with K_m = Φ_mᵀR_mΦ_m + λ_m I,
        over the checkpoints and multiplies by the averaged loss weight,
        like ``finalize_scores`` with each train example as its own target.
        High values flag examples the model fits only by memorizing them,
        such as mislabelled ones.
        The result is saved as ``self_scores.npy`` in the store.

        Args:
            model_ids: Checkpoints to average; default every finalized one.

        Returns:
            Shape (n_train,), float64, non-negative.

        Raises:
            OrderError: No checkpoint, or one of ``model_ids``, has finalized
                features.
        """
        model_ids = _model_ids(model_ids)
        finalized = self._finalized_ids()
        wanted = finalized if model_ids is None else model_ids
        unknown = [i for i in wanted if i not in finalized]
        if not wanted or unknown:
            raise OrderError(
                f"self_scores() needs finalized features, but model id(s) "
                f"{unknown or 'any'} have none in {str(self.save_dir)!r} "
                f"(finalized: {finalized or 'none'}); featurize the train set and "
                "call finalize_features() first"
            )
        features, lowers, dampings = [], [], {}
        weights = np.zeros(self.train_set_size, dtype=np.float64)
        for model_id in wanted:
            train = self.store.train_rows(model_id, writable=False)
            features.append(train.features)
            weights += train.weights
            lowers.append(self._factor(model_id))
            info = self.store.read(f"models/{model_id}/kernel.json")
            dampings[model_id] = info["damping"]
        values = self_scores(features, lowers, weights / len(wanted))
        path = self.store.path / "self_scores.npy"
        save_array(path, values)
        self.store.write("self_scores.json", {"model_ids": wanted})
        self.damping = dampings
        logger.info(
            "self-influence of %d train examples averaged over model ids %s "
            "written to %s",
            self.train_set_size,
            wanted,
            path,
        )
        return values

    # -- scoring ----------------------------------------------------------

    def start_scoring_checkpoint(
        self,
        exp_name: str,
        checkpoint: Any,
        model_id: int,
        num_targets: int,
    ) -> None:
        """Load checkpoint ``model_id`` to compute target features with it.

        Args:
            exp_name: Name of this set of targets.
            checkpoint: The same checkpoint that was featurized as
                ``model_id``.
            model_id: Its id.
            num_targets: T, the number of targets.

        Raises:
            OrderError: ``finalize_features`` has not run for this id.
            StoreMismatchError: The checkpoint differs from the featurized one,
                or the experiment exists with another number of targets.
        """
        num_targets = _positive_int(num_targets, "num_targets")
        model_id = _model_id(model_id)
        experiment = self.store.experiment_dir(exp_name)
        if self.store.read(f"models/{model_id}/kernel.json") is None:
            raise OrderError(
                f"model id {model_id} has no finalized features: call "
                "finalize_features() after featurizing the train set, then "
                "start_scoring_checkpoint()"
            )
        stamp = self._load(checkpoint, model_id)
        recorded = self.store.read(f"models/{int(model_id)}/checkpoint.json")
        if recorded is not None and recorded["fingerprint"] != stamp:
            raise StoreMismatchError(
                f"the checkpoint given for model id {model_id} differs from the "
                f"one its train features were computed with (fingerprint "
                f"{stamp}, featurized {recorded['fingerprint']}); pass the same "
                "checkpoint"
            )
        info = self.store.read(f"experiments/{exp_name}/experiment.json")
        if info is None:
            self.store.write(
                f"experiments/{exp_name}/experiment.json",
                {"num_targets": num_targets},
            )
        elif info["num_targets"] != num_targets:
            raise StoreMismatchError(
                f"experiment {exp_name!r} was started with num_targets="
                f"{info['num_targets']}, now {num_targets}; use another exp_name"
            )
        featurizer = Featurizer(
            self.model,
            self.task,
            self.layout,
            self._projector(int(model_id)),
            memory_bytes=self.memory_bytes,
        )
        self._scoring = _Scoring(exp_name, int(model_id), num_targets, featurizer)
        self._release()
        self._writer = None
        self._featurizer = None
        self._model_id = None
        logger.info(
            "scoring experiment %r with checkpoint %d (%d targets) in %s",
            exp_name,
            model_id,
            num_targets,
            experiment,
        )

    def score(
        self,
        batch: Any,
        inds: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        num_samples: int | None = None,
    ) -> None:
        """Compute and store the features of a batch of targets.

        Args:
            batch: Tuple, list or dict of tensors, first dimension B.
            inds: The B targets' indices: distinct integers in
                0..num_targets-1.
            num_samples: B, for targets fed in order.

        Raises:
            OrderError: ``start_scoring_checkpoint`` has not run.
            BatchError: As for ``featurize``.
        """
        state = self._scoring
        if state is None:
            raise OrderError(
                "score() needs a scoring checkpoint: call start_scoring_checkpoint("
                "exp_name, checkpoint, model_id, num_targets) first"
            )
        count = batch_size(batch)
        rows = _rows_of(inds, num_samples, count, state.cursor, state.num_targets)
        with _explain_placement(batch, state.featurizer):
            features, _ = state.featurizer(batch, rows)
        features = _storable(features.numpy(), self.store.feature_dtype, rows)
        arrays = self.store.target_rows(
            state.exp_name, state.model_id, state.num_targets
        )
        self.store.remove(f"experiments/{state.exp_name}/scores.json")
        arrays.write(rows, features)
        if num_samples is not None:
            state.cursor += count

    def finalize_scores(
        self,
        exp_name: str,
        model_ids: Sequence[int] | None = None,
        allow_skip: bool = False,
    ) -> np.ndarray:
        """Average the checkpoints' scores for experiment ``exp_name``.

        Args:
            exp_name: The experiment.
            model_ids: Checkpoints to average; default every finalized one.
            allow_skip: Average over the checkpoints whose targets are all
                scored, skipping (with a warning) those that are not.

        Returns:
            Shape (n_train, n_targets), float32: positive where the train
            example pushes the target's output up. A read-only memmap of
            ``experiments/<exp_name>/scores.npy``.

        Raises:
            OrderError: No target was scored, or some checkpoints' targets are
                incomplete and ``allow_skip`` is false.
        """
        self.store.experiment_dir(exp_name)
        model_ids = _model_ids(model_ids)
        allow_skip = _flag(allow_skip, "allow_skip")
        info = self.store.read(f"experiments/{exp_name}/experiment.json")
        if info is None:
            raise OrderError(
                f"experiment {exp_name!r} has no scored targets: call "
                "start_scoring_checkpoint() and score() before finalize_scores()"
            )
        num_targets = int(info["num_targets"])
        finalized = self._finalized_ids()
        wanted = finalized if model_ids is None else model_ids
        unknown = [i for i in wanted if i not in finalized]
        if unknown:
            raise OrderError(
                f"model id(s) {unknown} have no finalized features in "
                f"{str(self.save_dir)!r} (finalized: {finalized or 'none'}); "
                "featurize them and call finalize_features() first"
            )
        complete, incomplete = [], []
        for model_id in wanted:
            if self._targets_complete(exp_name, int(model_id), num_targets):
                complete.append(int(model_id))
            else:
                incomplete.append(int(model_id))
        if incomplete and not allow_skip:
            raise OrderError(
                f"experiment {exp_name!r} has unscored targets for model id(s) "
                f"{', '.join(map(str, incomplete))}; score them with "
                "start_scoring_checkpoint() and score(), or pass allow_skip=True "
                f"to average over the complete ones ({complete or 'none'})"
            )
        if incomplete:
            warnings.warn(
                f"finalize_scores skips model id(s) {incomplete}, whose targets "
                f"are not all scored; averaging over {complete}",
                stacklevel=2,
            )
        if not complete:
            raise OrderError(
                f"experiment {exp_name!r} has no model id with all {num_targets} "
                "targets scored; score them first"
            )
        return self._combine(exp_name, complete, num_targets)

    def _finalized_ids(self) -> list[int]:
        return [
            i
            for i in self.store.model_ids()
            if self.store.read(f"models/{i}/kernel.json") is not None
        ]

    def _factor(self, model_id: int) -> np.ndarray:
        """The (k, k) float64 Cholesky factor of one checkpoint's kernel.

        Raises:
            StoreCorruptError: ``cholesky.npy`` is missing, cut off or of
                another shape; ``finalize_features()`` writes it again.
        """
        path = self.store.model_dir(model_id) / "cholesky.npy"
        k = self.store.k
        try:
            lower = np.load(path)
        except (OSError, ValueError) as error:
            problem = (
                "is missing"
                if isinstance(error, FileNotFoundError)
                else (f"cannot be read ({error})")
            )
        else:
            if lower.shape == (k, k) and lower.dtype == np.float64:
                return lower
            problem = f"holds shape {lower.shape} and dtype {lower.dtype}"
        raise StoreCorruptError(
            f"{path}, the kernel factor of model id {model_id}, {problem}; "
            f"expected ({k}, {k}) float64; call finalize_features() again to "
            "recompute it"
        )

    def _factor_readable(self, model_id: int) -> bool:
        try:
            self._factor(model_id)
        except StoreCorruptError:
            return False
        return True

    def _targets_complete(self, exp_name: str, model_id: int, num: int) -> bool:
        if self.store.read(f"models/{model_id}/kernel.json") is None:
            return False
        try:
            arrays = self.store.target_rows(exp_name, model_id, num, writable=False)
        except FileNotFoundError:
            return False
        return arrays.missing().size == 0

    def _combine(self, exp_name: str, ids: list[int], num_targets: int) -> np.ndarray:
        solved, features, dampings = [], [], {}
        weights = np.zeros(self.train_set_size, dtype=np.float64)
        for model_id in ids:
            lower = self._factor(model_id)
            targets = self.store.target_rows(
                exp_name, model_id, num_targets, writable=False
            ).features
            solved.append(kernel.solve(lower, np.asarray(targets).T))
            train = self.store.train_rows(model_id, writable=False)
            features.append(train.features)
            weights += train.weights
            dampings[model_id] = self.store.read(f"models/{model_id}/kernel.json")[
                "damping"
            ]
        weights /= len(ids)
        path = self.store.experiment_dir(exp_name) / "scores.npy"
        shape = (self.train_set_size, num_targets)
        with new_array(path, shape, "float32") as out:
            ensemble_scores(features, solved, weights, out=out)
            if not np.isfinite(out).all():
                raise NumericalError(_nonfinite_scores(ids, features, solved, weights))
        self.store.write(
            f"experiments/{exp_name}/scores.json",
            {"model_ids": ids, "damping": {str(k): v for k, v in dampings.items()}},
        )
        logger.info(
            "scores of experiment %r averaged over model ids %s written to %s",
            exp_name,
            ids,
            path,
        )
        self.damping = dampings
        return np.load(path, mmap_mode="r")


def _nonfinite_scores(
    ids: list[int], features: list[np.ndarray], solved: list[np.ndarray], weights
) -> str:
    """Say which stored arrays made the scores non-finite."""
    where = []
    for model_id, train, target in zip(ids, features, solved, strict=True):
        if not all(
            np.isfinite(train[i : i + 4096]).all() for i in range(0, len(train), 4096)
        ):
            where.append(f"the train features of model id {model_id}")
        if not np.isfinite(target).all():
            where.append(f"the target features of model id {model_id}")
    if not np.isfinite(weights).all():
        where.append("the train loss weights")
    found = ", ".join(where) if where else "the products overflowed float32"
    return (
        f"the scores hold NaN or infinity ({found}); nothing was written. "
        "Featurize the named checkpoint again (or score its targets again) in a "
        "new save_dir"
    )


# Phrases of torch's (and users' own) messages about a tensor's dtype or device.
_PLACEMENT = re.compile(
    r"dtype|scalar type|device|\btype \([\w.]+\) and \w+ type", re.IGNORECASE
)


@contextmanager
def _explain_placement(batch: Any, featurizer: Featurizer) -> Iterator[None]:
    """Turn a dtype or device failure inside the model into a ``BatchError``.

    The batch's floating tensors are cast to the model's dtype and every
    tensor is moved to its device; what is left (integer inputs a model
    wants as floats, tensors the model creates on another device) fails
    inside the user's code with torch's message, which this names.
    """
    try:
        yield
    except (RuntimeError, TypeError, AssertionError) as error:
        unrelated = isinstance(error, KerntraceError | torch.cuda.OutOfMemoryError)
        if unrelated or not _PLACEMENT.search(str(error)):
            raise
        held = ", ".join(
            f"{label} {value.dtype} on {value.device}"
            for label, value in batch_items(batch)
            if isinstance(value, torch.Tensor)
        )
        raise BatchError(
            f"the model failed on this batch with a dtype or device error "
            f"({type(error).__name__}: {_first_line(error)}). kerntrace moves "
            f"every tensor of the batch to the device of the model's first "
            f"parameter ({featurizer.device}) and casts floating tensors to its "
            f"dtype ({featurizer.dtype}); integer and boolean tensors keep their "
            f"dtype. The batch holds {held}: convert inputs the model needs as "
            "floats yourself (e.g. images.float() / 255), and keep the model's "
            "parameters on one device and dtype"
        ) from error


def _first_line(error: BaseException, limit: int = 300) -> str:
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


_HALF = np.finfo(np.float16)


def _storable(features: np.ndarray, dtype: np.dtype, rows: np.ndarray) -> np.ndarray:
    """Features converted to the store's dtype, refusing what float16 loses.

    Raises:
        NumericalError: Some feature overflows float16 (|φ| > 65504), which
            would store infinity; nothing is written.

    Warns:
        PrecisionWarning: Some row loses more than 1 % of its norm to float16
            rounding, because its features are in float16's subnormal range.
    """
    if dtype != np.float16:
        return features
    with np.errstate(over="ignore"):
        stored = features.astype(np.float16)
    finite = np.isfinite(stored).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise NumericalError(
            f"features of example(s) {rows[bad[:5]].tolist()} reach "
            f"{float(np.abs(features[bad]).max()):.3g}, beyond float16's largest "
            f"value {float(_HALF.max):g}, so storing them in half precision "
            "would give infinity; nothing of this batch was written. Use "
            "feature_dtype='float32' (use_half_precision=False) in a new save_dir"
        )
    exact = features.astype(np.float64)
    norms = np.linalg.norm(exact, axis=1)
    errors = np.linalg.norm(stored.astype(np.float64) - exact, axis=1)
    lossy = errors > 0.01 * norms
    if lossy.any():
        relative = np.where(norms > 0, errors / np.maximum(norms, 1e-300), 0.0)
        worst = int(np.argmax(relative))
        warnings.warn(
            f"{int(lossy.sum())} example(s) of this batch, e.g. {int(rows[worst])} "
            f"(largest |φ| {float(np.abs(features[worst]).max()):.2g}), lose "
            f"{100 * relative[worst]:.0f}% of their feature norm when stored in "
            f"float16: their features fall below float16's normal range "
            f"({float(_HALF.tiny):.2g}); use feature_dtype='float32' for gradients "
            "this small",
            PrecisionWarning,
            stacklevel=3,
        )
        return stored
    if exact.shape[0] > 1:
        spread = np.sqrt(np.mean(np.sum((exact - exact.mean(0)) ** 2, axis=1)))
        rounding = np.sqrt(np.mean(errors**2))
        if rounding > 0.05 * spread:
            warnings.warn(
                f"float16 rounding of this batch's features is "
                f"{100 * rounding / max(spread, 1e-300):.0g}% of how much they "
                "differ between examples (a component shared by every example, "
                "such as a bias gradient, dwarfs the rest), so the scores will "
                "be dominated by rounding; use feature_dtype='float32'",
                PrecisionWarning,
                stacklevel=3,
            )
    return stored


def _take(batch: Any, rows: np.ndarray) -> Any:
    index = torch.as_tensor(rows, dtype=torch.long)
    if isinstance(batch, dict):
        return {
            k: v[index.to(v.device)] if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }
    return type(batch)(
        v[index.to(v.device)] if isinstance(v, torch.Tensor) else v for v in batch
    )


@contextmanager
def _working_dir(
    save_dir: str | os.PathLike[str] | None,
) -> Iterator[tuple[Path, bool]]:
    """The store directory, or a temporary one deleted afterwards."""
    if save_dir is not None:
        yield Path(save_dir), False
        return
    with tempfile.TemporaryDirectory(prefix="kerntrace-") as tmp:
        yield Path(tmp), True


def _count(batches: Iterable[Any], what: str) -> int:
    if isinstance(batches, Mapping | torch.Tensor) or not isinstance(batches, Iterable):
        raise ConfigurationError(
            f"{what} must be re-iterable batches (a list of batches or a "
            f"DataLoader), got a {type(batches).__name__}; for one batch pass "
            f"[batch]"
        )
    if iter(batches) is batches:
        raise ConfigurationError(
            f"{what} is an iterator ({type(batches).__name__}), which can be "
            "read only once, but it is read once per checkpoint; pass a list of "
            "batches or a DataLoader"
        )
    sampler = getattr(batches, "sampler", None)
    if isinstance(sampler, torch.utils.data.RandomSampler):
        raise ConfigurationError(
            f"{what} is a DataLoader with shuffle=True: its batches come in "
            "another order each pass, so examples could not be told apart across "
            "checkpoints; pass a DataLoader with shuffle=False"
        )
    dataset = getattr(batches, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    total = sum(batch_size(b) for b in batches)
    if total == 0:
        raise ConfigurationError(f"{what} holds no examples")
    return total


def _featurized(
    model: nn.Module,
    checkpoints: list[Any],
    train: Iterable[Any],
    *,
    task: str | Task,
    save_dir: str | os.PathLike[str],
    progress: bool,
    options: dict[str, Any],
) -> TRAKer:
    """A ``TRAKer`` whose train features are computed and finalized."""
    n_train = _count(train, "train")
    traker = TRAKer(model, task, n_train, save_dir, **options)
    for model_id, checkpoint in enumerate(checkpoints):
        traker.load_checkpoint(checkpoint, model_id=model_id)
        for batch in tqdm(
            train, desc=f"featurize {model_id}", disable=not progress, leave=False
        ):
            traker.featurize(batch, num_samples=batch_size(batch))
    traker.finalize_features()
    return traker


def _checkpoint_list(checkpoints: Sequence[Any]) -> list[Any]:
    single = isinstance(checkpoints, Mapping | nn.Module | str | os.PathLike)
    if single or not isinstance(checkpoints, Iterable):
        raise ConfigurationError(
            f"checkpoints must be a list of checkpoints, got one "
            f"{type(checkpoints).__name__}; for a single checkpoint pass "
            "[checkpoint]"
        )
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ConfigurationError("checkpoints is empty; pass at least one")
    return checkpoints


def attribute(
    model: nn.Module,
    checkpoints: Sequence[Any],
    train: Iterable[Any],
    targets: Iterable[Any],
    *,
    task: str | Task = "image_classification",
    save_dir: str | os.PathLike[str] | None = None,
    exp_name: str = "targets",
    progress: bool = True,
    **options: Any,
) -> Scores:
    """Attribute every target to every train example in one call.

    Args:
        model: The network; each checkpoint is loaded into it in turn.
        checkpoints: State dicts, modules, or ``.pt`` / ``.safetensors`` paths.
        train: Re-iterable batches of train examples, in a fixed order (a
            list of batches or a ``DataLoader`` without shuffling).
        targets: Re-iterable batches of targets.
        task: Task name or object.
        save_dir: Store directory; a temporary one (deleted afterwards) if
            ``None``.
        exp_name: Name of the target set in the store.
        progress: Show progress bars.
        **options: Passed to ``TRAKer`` (``proj_dim``, ``lambda_reg``, …).

    Returns:
        The scores, shape (n_train, n_targets).
    """
    checkpoints = _checkpoint_list(checkpoints)
    n_targets = _count(targets, "targets")
    with _working_dir(save_dir) as (directory, temporary):
        traker = _featurized(
            model,
            checkpoints,
            train,
            task=task,
            save_dir=directory,
            progress=progress,
            options=options,
        )
        for model_id, checkpoint in enumerate(checkpoints):
            traker.start_scoring_checkpoint(exp_name, checkpoint, model_id, n_targets)
            for batch in tqdm(
                targets, desc=f"score {model_id}", disable=not progress, leave=False
            ):
                traker.score(batch, num_samples=batch_size(batch))
        values = traker.finalize_scores(exp_name)
        return Scores(
            np.array(values) if temporary else values,
            tuple(range(len(checkpoints))),
            dict(traker.damping),
            None if temporary else directory,
        )


def audit(
    model: nn.Module,
    checkpoints: Sequence[Any],
    train: Iterable[Any],
    *,
    task: str | Task = "image_classification",
    save_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    **options: Any,
) -> Audit:
    """Rank the train examples by self-influence, most suspicious first.

    Featurizes and finalizes like ``attribute``, then scores each train
    example as its own target (``TRAKer.self_scores``). Mislabelled and
    otherwise atypical examples come first.

    Args:
        model: The network; each checkpoint is loaded into it in turn.
        checkpoints: State dicts, modules, or ``.pt`` / ``.safetensors`` paths.
        train: Re-iterable batches of train examples, in a fixed order, with
            the labels the model was trained on.
        task: Task name or object.
        save_dir: Store directory; a temporary one (deleted afterwards) if
            ``None``.
        progress: Show progress bars.
        **options: Passed to ``TRAKer`` (``proj_dim``, ``lambda_reg``, …).

    Returns:
        The audit: ``self_scores`` (n_train,) float64, ``ranking`` (n_train,)
        int64 and ``top(k)``.
    """
    checkpoints = _checkpoint_list(checkpoints)
    with _working_dir(save_dir) as (directory, temporary):
        traker = _featurized(
            model,
            checkpoints,
            train,
            task=task,
            save_dir=directory,
            progress=progress,
            options=options,
        )
        ids = list(range(len(checkpoints)))
        values = np.array(traker.self_scores(model_ids=ids))
        return Audit.from_self_scores(
            values, tuple(ids), dict(traker.damping), None if temporary else directory
        )
