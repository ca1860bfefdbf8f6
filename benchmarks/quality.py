"""Side-by-side LDS of kerntrace and the reference ``traker`` 0.3.2.

For each dataset this script trains 10 checkpoints, retrains models on random
half-subsets of the training set (twice, with different seeds, so the noise
ceiling of the LDS is known), featurizes the training set once per tool and
projection dimension k with all 10 checkpoints, and scores the targets with
M = 1, 5 and 10 of them:

- kerntrace with its defaults (only ``proj_dim`` given; λ chosen by it);
- ``traker`` with its defaults on CPU (``lambda_reg=0``, float16 storage,
  the Gaussian ``BasicProjector``);
- ``traker`` with the best ``lambda_reg`` of a log grid, chosen on the very
  targets it is scored on (an optimistic upper bound for ``traker``).

Everything expensive is cached under ``benchmarks/.cache/quality/<dataset>/``
(checkpoints, retrained outputs, stores, one JSON of results), so a rerun
only computes what is missing. The tables, timings and pass/fail checks go
into the Quality section of ``benchmarks/RESULTS.md``.

kerntrace's other projectors (``plan.projectors`` at ``plan.projector_dims``)
run with the same defaults, to compare their LDS at equal k.

Run ``python benchmarks/quality.py [--datasets digits fashion] [--quick]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch
from tqdm.auto import tqdm

import kerntrace
from kerntrace import data, evaluate, models

logger = logging.getLogger("quality")

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "RESULTS.md"
START, END = "<!-- quality:start -->", "<!-- quality:end -->"
EXP = "targets"


@dataclass(frozen=True)
class Recipe:
    """How the checkpoints and retrained models of a dataset are trained.

    Attributes:
        widths: MLP layer widths (input, hidden…, classes).
        steps: Full-batch AdamW steps.
        lr: Learning rate.
        weight_decay: Decoupled L2 penalty.
    """

    widths: tuple[int, ...]
    steps: int = 300
    lr: float = 3e-3
    weight_decay: float = 1e-3

    def tag(self) -> str:
        """A name for cached files that depend on the recipe."""
        widths = "-".join(map(str, self.widths))
        return f"mlp{widths}-s{self.steps}-lr{self.lr:g}-wd{self.weight_decay:g}"

    def describe(self) -> str:
        """The recipe in words, for RESULTS.md."""
        widths = "-".join(map(str, self.widths))
        return (
            f"MLP {widths} (ReLU), full-batch AdamW, {self.steps} steps, "
            f"lr {self.lr:g}, weight decay {self.weight_decay:g}"
        )


@dataclass(frozen=True)
class Plan:
    """The grid of one run.

    Attributes:
        checkpoints: Checkpoints featurized (seeds 0..checkpoints-1).
        ensembles: The M values scored, each ≤ checkpoints.
        proj_dims: The k values.
        subsets: Random half-subsets retrained for the ground truth.
        grid: λ grid of traker, as multiples of its mean squared feature norm.
        search_grid: The decades searched where the strategy is "search" (k
            above ``full_grid_max_k``): the full grid showed the optimum
            near c = 0.3, λ = 0 behaviour for c ≤ 1e-4 (float16 kernel) and
            NaN scores for large c (float16 overflow) at smaller k.
        full_grid_max_k: Caps ``FULL_GRID_MAX_K`` (see ``run_traker``).
        traker_budget: Seconds; a traker featurization estimated (from its
            first batch) to take longer is skipped.
        batch: Batch size of featurization and scoring, for both tools.
        projectors: Projectors run besides the default (``auto``) at
            ``projector_dims``, to compare their LDS at equal k.
        projector_dims: The k values of that comparison.
    """

    checkpoints: int = 10
    ensembles: tuple[int, ...] = (1, 5, 10)
    proj_dims: tuple[int, ...] = (512, 2048, 8192)
    subsets: int = 100
    grid: tuple[float, ...] = tuple(10.0**e for e in range(-6, 5))
    search_grid: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0)
    full_grid_max_k: int = 2048
    traker_budget: float = 600.0
    batch: int = 500
    projectors: tuple[str, ...] = ("dense", "sparse")
    projector_dims: tuple[int, ...] = (512, 2048)


QUICK = Plan(
    checkpoints=2,
    ensembles=(1, 2),
    proj_dims=(256, 2048),
    subsets=20,
    grid=(1e-3, 1e-1, 1e1),
    search_grid=(1e-1, 1e1),
    full_grid_max_k=256,
    traker_budget=120.0,
    projector_dims=(256,),
)


@dataclass
class Problem:
    """A dataset ready for attribution.

    Attributes:
        name: ``"digits"`` or ``"fashion"``.
        train: The training examples.
        targets: The examples whose predictions are attributed.
        recipe: How models are trained.
        source: Where the data comes from, in words.
    """

    name: str
    train: data.Dataset
    targets: data.Dataset
    recipe: Recipe
    source: str
    extra: dict[str, Any] = field(default_factory=dict)


def load_problem(name: str) -> Problem:
    """Load a dataset with its fixed train / target split and recipe."""
    if name == "digits":
        train, test = data.split(data.load_digits(), n_train=1200, seed=0)
        return Problem(
            name,
            train,
            test,
            Recipe((64, 64, 10)),
            "scikit-learn digits, `data.split(n_train=1200, seed=0)`; "
            "targets: all 597 test digits",
        )
    if name == "fashion":
        full = data.load_fashion_mnist(split="train")
        rows = np.sort(np.random.default_rng(0).choice(len(full), 5000, replace=False))
        test = data.load_fashion_mnist(split="test")
        picks = np.sort(np.random.default_rng(1).choice(len(test), 500, replace=False))
        return Problem(
            name,
            full.subset(rows),
            test.subset(picks),
            Recipe((784, 64, 10)),
            "Fashion-MNIST (Debian `dataset-fashion-mnist`): 5,000 training "
            "images drawn with `default_rng(0)` from the 60,000; targets: 500 "
            "test images drawn with `default_rng(1)` from the 10,000",
        )
    raise ValueError(f"unknown dataset {name!r}; use 'digits' or 'fashion'")


# -- training ---------------------------------------------------------------


def train_model(recipe: Recipe, dataset: data.Dataset, seed: int) -> torch.nn.Module:
    """Train one MLP on ``dataset`` with ``seed`` (one thread: tiny steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = models.mlp(recipe.widths, seed=seed)
        return models.train_classifier(
            model,
            dataset.x,
            dataset.y,
            steps=recipe.steps,
            lr=recipe.lr,
            weight_decay=recipe.weight_decay,
            seed=seed,
        )
    finally:
        torch.set_num_threads(threads)


def checkpoints(problem: Problem, count: int, cache: Path) -> list[Path]:
    """Train (or reuse) the checkpoints with seeds 0..count-1."""
    folder = cache / f"checkpoints-{problem.recipe.tag()}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in tqdm(range(count), desc=f"{problem.name} checkpoints", leave=False):
        path = folder / f"model_{seed}.pt"
        if not path.exists():
            model = train_model(problem.recipe, problem.train, seed)
            tmp = path.with_suffix(".tmp")
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, path)
        paths.append(path)
    return paths


def accuracy(problem: Problem, path: Path) -> float:
    """Accuracy of a checkpoint on the targets."""
    model = models.mlp(problem.recipe.widths)
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(problem.targets.x))
    return float((logits.argmax(1).numpy() == problem.targets.y).mean())


def ground_truth(
    problem: Problem, subsets: int, cache: Path, seed_base: int
) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the random halves and the margins of models retrained on them.

    Subset j is trained with seed ``seed_base + j``.

    Returns:
        ``(masks, outputs)``: shapes (subsets, n_train) bool and
        (subsets, n_targets) float64.
    """
    masks = evaluate.make_subsets(len(problem.train), subsets, seed=1)

    def train_fn(indices: np.ndarray, number: int) -> torch.nn.Module:
        return train_model(
            problem.recipe, problem.train.subset(indices), seed_base + number
        )

    def eval_fn(model: torch.nn.Module) -> np.ndarray:
        return models.margins(model, problem.targets.x, problem.targets.y)

    folder = cache / f"retrain-{problem.recipe.tag()}-seed{seed_base}"
    outputs = evaluate.retrain(train_fn, masks, eval_fn, folder)
    return masks, outputs


def ceiling(first: np.ndarray, second: np.ndarray) -> float:
    """Mean over targets of the Spearman correlation, across subsets, of two
    retrainings of the same subsets with different seeds."""
    values = [
        scipy.stats.spearmanr(first[:, t], second[:, t]).statistic
        for t in range(first.shape[1])
    ]
    return float(np.nanmean(values))


def batches(dataset: data.Dataset, size: int) -> list[tuple[torch.Tensor, ...]]:
    """The dataset in order, as (x, y) batches."""
    x, y = torch.as_tensor(dataset.x), torch.as_tensor(dataset.y)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


# -- results cache ------------------------------------------------------------


class Results:
    """A JSON file of finished measurements, written after each one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = (
            json.loads(path.read_text()) if path.exists() else {}
        )

    def get(self, key: str) -> Any:
        """The stored value of ``key``, or ``None``."""
        return self.data.get(key)

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` and save the file atomically."""
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def lds_record(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> dict:
    """LDS, its 95 % bootstrap interval and the count of non-finite scores."""
    scores = np.asarray(scores, dtype=np.float64)
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        scores = np.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
    try:
        result = evaluate.lds(scores, masks, outputs)
    except kerntrace.ConfigurationError as error:
        return {"lds": float("nan"), "ci": [float("nan")] * 2, "error": str(error)}
    return {"lds": result.value, "ci": list(result.interval), "nonfinite": bad}


# -- kerntrace ------------------------------------------------------------------


def _store(problem: Problem, k: int, cache: Path, projector: str = "auto") -> Path:
    return cache / f"kerntrace-{projector}-{problem.recipe.tag()}-k{k}"


def _key(k: int, projector: str = "auto") -> str:
    """Results key of kerntrace at k: the default (``auto``) or a projector."""
    return f"kerntrace/k{k}" if projector == "auto" else f"kerntrace/{projector}/k{k}"


def source_stamp() -> str:
    """git HEAD of the repository and a hash of src/kerntrace as it is now."""
    import hashlib
    import subprocess

    folder = Path(kerntrace.__file__).resolve().parent
    digest = hashlib.sha1()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=folder,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = "unknown"
    return f"{head}+src-sha1:{digest.hexdigest()[:10]}"


SOURCE = source_stamp()
"""The kerntrace source this process imported (hashed at start)."""


def _sources(results: Results) -> list[str]:
    stamps = {
        v.get("source", "not recorded (run before stamping)")
        for key, v in results.data.items()
        if key.startswith("kerntrace/") and isinstance(v, dict)
    }
    return sorted(stamps)


def run_kerntrace(
    problem: Problem,
    paths: list[Path],
    k: int,
    plan: Plan,
    truth: tuple[np.ndarray, np.ndarray],
    cache: Path,
    results: Results,
    projector: str = "auto",
) -> None:
    """kerntrace defaults at k (``projector`` the only other option given):
    featurize once with every checkpoint, score with the first M of them for
    each M."""
    key = _key(k, projector)
    if results.get(key) is not None:
        return
    store = _store(problem, k, cache, projector)
    traker = kerntrace.TRAKer(
        models.mlp(problem.recipe.widths),
        "image_classification",
        len(problem.train),
        store,
        proj_dim=k,
        projector=projector,
    )
    started = time.perf_counter()
    for model_id, path in enumerate(tqdm(paths, desc=f"kerntrace k={k}", leave=False)):
        traker.load_checkpoint(path, model_id=model_id)
        for batch in batches(problem.train, plan.batch):
            traker.featurize(batch, num_samples=len(batch[0]))
    featurized = time.perf_counter()
    traker.finalize_features()
    finalized = time.perf_counter()
    for model_id, path in enumerate(paths):
        traker.start_scoring_checkpoint(EXP, path, model_id, len(problem.targets))
        for batch in batches(problem.targets, plan.batch):
            traker.score(batch, num_samples=len(batch[0]))
    scored = time.perf_counter()
    record: dict[str, Any] = {
        "source": SOURCE,
        "projector": traker.projector_kind,
        "featurize_s": featurized - started,
        "finalize_features_s": finalized - featurized,
        "score_targets_s": scored - finalized,
        "by_m": {},
    }
    for m in plan.ensembles:
        tick = time.perf_counter()
        scores = np.array(traker.finalize_scores(EXP, model_ids=list(range(m))))
        entry = lds_record(scores, *truth)
        entry["finalize_scores_s"] = time.perf_counter() - tick
        entry["damping"] = [traker.damping[i] for i in range(m)]
        record["by_m"][str(m)] = entry
        logger.info("kerntrace k=%d M=%d: LDS %.4f", k, m, entry["lds"])
    norms = [
        float(np.mean(np.square(traker.store.train_rows(i).features, dtype=np.float64)))
        * k
        for i in range(len(paths))
    ]
    record["mean_sq_norm"] = float(np.mean(norms))
    results.put(key, record)


# -- traker -----------------------------------------------------------------------


def _traker_class() -> Any:
    import trak  # the reference implementation, installed by the bench extra

    return trak.TRAKer


def _make_traker(problem: Problem, k: int, save_dir: Path, lambda_reg: float) -> Any:
    """A traker TRAKer with its defaults, on CPU, at k and λ."""
    return _traker_class()(
        model=models.mlp(problem.recipe.widths),
        task="image_classification",
        train_set_size=len(problem.train),
        save_dir=str(save_dir),
        device="cpu",
        proj_dim=k,
        lambda_reg=lambda_reg,
        logging_level=logging.WARNING,
    )


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def traker_featurize(
    problem: Problem,
    paths: list[Path],
    k: int,
    plan: Plan,
    base: Path,
    results: Results,
) -> dict[str, Any]:
    """Featurize the train set with traker once (no finalization), so that
    each λ can be finalized in a copy of this directory."""
    key = f"traker/k{k}/featurize"
    done = results.get(key)
    if done is not None:
        return done
    traker = _make_traker(problem, k, base, 0.0)
    n_rows = len(problem.train) * len(paths)
    started = time.perf_counter()
    first = True
    for model_id, path in enumerate(tqdm(paths, desc=f"traker k={k}", leave=False)):
        traker.load_checkpoint(_state(path), model_id=model_id)
        for batch in batches(problem.train, plan.batch):
            tick = time.perf_counter()
            traker.featurize(batch=batch, num_samples=len(batch[0]))
            if first:
                first = False
                per_example = (time.perf_counter() - tick) / len(batch[0])
                estimate = per_example * n_rows
                logger.info(
                    "traker k=%d: %.2f ms per train example, about %.0f s for "
                    "%d checkpoints",
                    k,
                    1e3 * per_example,
                    estimate,
                    len(paths),
                )
                if estimate > plan.traker_budget:
                    record = {
                        "skipped": True,
                        "per_example_s": per_example,
                        "estimate_s": estimate,
                    }
                    results.put(key, record)
                    shutil.rmtree(base, ignore_errors=True)
                    return record
    record = {"skipped": False, "featurize_s": time.perf_counter() - started}
    results.put(key, record)
    return record


def traker_lambda(
    problem: Problem,
    paths: list[Path],
    k: int,
    lambda_reg: float,
    ensembles: Sequence[int],
    plan: Plan,
    truth: tuple[np.ndarray, np.ndarray],
    base: Path,
    results: Results,
    name: str,
) -> None:
    """Finalize, score and evaluate traker at one λ for the given M values.

    The featurized directory is copied (before any finalization) to a
    directory of this λ; traker's own finalize_features / score /
    finalize_scores run there, for the first max(M) checkpoints only.
    """
    todo = [m for m in ensembles if results.get(f"traker/k{k}/{name}/M{m}") is None]
    if not todo:
        return
    folder = base.parent / f"{base.name}-{name}"
    if not folder.exists():
        shutil.copytree(base, folder.with_suffix(".tmp"), dirs_exist_ok=True)
        os.replace(folder.with_suffix(".tmp"), folder)
    traker = _make_traker(problem, k, folder, lambda_reg)
    ids = list(range(max(todo)))
    tick = time.perf_counter()
    error = None
    try:
        traker.finalize_features(model_ids=ids)
    except Exception as caught:  # traker's own failure is a result here
        error = f"{type(caught).__name__}: {caught}"
    finalized = time.perf_counter()
    if error is None:
        for model_id in ids:
            traker.start_scoring_checkpoint(
                EXP, _state(paths[model_id]), model_id, len(problem.targets)
            )
            for batch in batches(problem.targets, plan.batch):
                traker.score(batch=batch, num_samples=len(batch[0]))
    scored = time.perf_counter()
    for m in todo:
        if error is None:
            scores = np.array(traker.finalize_scores(EXP, model_ids=list(range(m))))
            entry = lds_record(scores, *truth)
        else:
            entry = {"lds": float("nan"), "ci": [float("nan")] * 2, "error": error}
        entry.update(
            lambda_reg=lambda_reg,
            finalize_features_s=finalized - tick,
            score_targets_s=scored - finalized,
            checkpoints_finalized=len(ids),
        )
        results.put(f"traker/k{k}/{name}/M{m}", entry)
        logger.info("traker k=%d %s M=%d: LDS %.4f", k, name, m, entry["lds"])
    shutil.rmtree(folder, ignore_errors=True)


FULL_GRID_MAX_K = {"digits": 2048, "fashion": 512}
"""Per dataset, the largest k at which every grid λ is scored at every M."""


def _name(c: float) -> str:
    return f"c{c:.4g}"


def run_traker(
    problem: Problem,
    paths: list[Path],
    k: int,
    plan: Plan,
    truth: tuple[np.ndarray, np.ndarray],
    cache: Path,
    results: Results,
) -> None:
    """traker at k: its default λ=0, then the λ grid.

    The grid is c · s for the decades c of ``plan.grid`` and s traker's mean
    squared feature norm; the two half-decades around the best decade (at
    the smallest M) are added. Up to ``FULL_GRID_MAX_K`` every λ is scored at
    every M ("full"); above it the grid is scored at the smallest M only and
    the best λ there is scored at the other M ("search").
    """
    base = cache / f"traker-{problem.recipe.tag()}-k{k}" / "featurized"
    info = traker_featurize(problem, paths, k, plan, base, results)
    if info.get("skipped"):
        return
    run = (problem, paths, k)
    rest = (plan, truth, base, results)
    traker_lambda(*run, 0.0, plan.ensembles, *rest, "default")
    scale = results.get(f"traker/k{k}/scale")
    if scale is None:  # kept once set, so cached λ runs stay comparable
        mean_sq_norm = results.get(f"kerntrace/k{k}")["mean_sq_norm"]
        scale = (k / _num_params(problem)) * mean_sq_norm
        results.put(f"traker/k{k}/scale", scale)
    strategy = results.get(f"traker/k{k}/strategy")
    if strategy is None:
        full = k <= min(FULL_GRID_MAX_K.get(problem.name, 0), plan.full_grid_max_k)
        strategy = "full" if full else "search"
        results.put(f"traker/k{k}/strategy", strategy)
    first = plan.ensembles[0]
    searched = list(plan.ensembles) if strategy == "full" else [first]

    def evaluate_at(values: Sequence[float], where: str) -> None:
        for c in tqdm(values, desc=f"traker λ {where} k={k}", leave=False):
            traker_lambda(*run, c * scale, searched, *rest, _name(c))

    def best_at_first(values: Sequence[float]) -> float:
        lds = [results.get(f"traker/k{k}/{_name(c)}/M{first}")["lds"] for c in values]
        lds = [v if math.isfinite(v) else -np.inf for v in lds]
        return values[int(np.argmax(lds))]

    decades = list(plan.grid if strategy == "full" else plan.search_grid)
    results.put(f"traker/k{k}/decades", decades)
    evaluate_at(decades, "decades")
    centre = best_at_first(decades)
    refined = [centre * 10**-0.5, centre * 10**0.5]
    evaluate_at(refined, "half-decades")
    tried = sorted([*decades, *refined])
    results.put(f"traker/k{k}/grid", tried)
    if strategy == "search":
        best = best_at_first(tried)
        traker_lambda(*run, best * scale, plan.ensembles, *rest, _name(best))
    for c in tried:
        shutil.rmtree(base.parent / f"{base.name}-{_name(c)}", ignore_errors=True)


def _num_params(problem: Problem) -> int:
    return sum(p.numel() for p in models.mlp(problem.recipe.widths).parameters())


# -- report -----------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.{digits}f}"


def summarize(problem: Problem, plan: Plan, results: Results) -> dict[str, Any]:
    """Collect, per (M, k), the numbers of the table and of the checks."""
    rows = []
    for m in plan.ensembles:
        for k in plan.proj_dims:
            if results.get(f"kerntrace/k{k}") is None:
                continue  # not run (a reduced grid); said in the report
            kt = results.get(f"kerntrace/k{k}")["by_m"][str(m)]
            row: dict[str, Any] = {"M": m, "k": k, "kt": kt}
            feat = results.get(f"traker/k{k}/featurize")
            if feat is None or feat.get("skipped"):
                row["skipped"] = feat
                rows.append(row)
                continue
            row["default"] = results.get(f"traker/k{k}/default/M{m}")
            grid, row["n_tried"], row["nan_c"] = [], 0, []
            for c in results.get(f"traker/k{k}/grid") or []:
                entry = results.get(f"traker/k{k}/{_name(c)}/M{m}")
                if entry is None:
                    continue
                row["n_tried"] += 1
                if math.isfinite(entry["lds"]):
                    grid.append((c, entry))
                else:
                    row["nan_c"].append(c)
            row["grid"] = grid
            row["strategy"] = results.get(f"traker/k{k}/strategy")
            if grid:
                index = int(np.argmax([e["lds"] for _, e in grid]))
                row["best_c"], row["best"] = grid[index]
                decades = results.get(f"traker/k{k}/decades") or list(plan.grid)
                row["decades"] = decades
                row["edge"] = row["best_c"] in (min(decades), max(decades))
            rows.append(row)
    return {"rows": rows, "projectors": projector_rows(plan, results)}


def projector_rows(plan: Plan, results: Results) -> list[dict[str, Any]]:
    """Per (M, k) of the comparison, the LDS of each projector run there."""
    rows = []
    for m in plan.ensembles:
        for k in plan.projector_dims:
            default = results.get(_key(k))
            if default is None:
                continue
            values = {default.get("projector", "auto"): default["by_m"][str(m)]["lds"]}
            for projector in plan.projectors:
                entry = results.get(_key(k, projector))
                if entry is not None:
                    values[projector] = entry["by_m"][str(m)]["lds"]
            if len(values) > 1:
                rows.append({"M": m, "k": k, "lds": values})
    return rows


def projector_table(summary: dict[str, Any]) -> list[str]:
    """The markdown table of LDS per projector at equal k."""
    names = sorted({p for row in summary["projectors"] for p in row["lds"]})
    lines = [
        "| M | k | " + " | ".join(f"`{p}`" for p in names) + " | max − min |",
        "|---:|---:|" + "---:|" * (len(names) + 1),
    ]
    for row in summary["projectors"]:
        values = row["lds"]
        cells = " | ".join(_fmt(values.get(p)) for p in names)
        spread = max(values.values()) - min(values.values())
        lines.append(f"| {row['M']} | {row['k']} | {cells} | {spread:.3f} |")
    return lines


def checks(summaries: dict[str, dict[str, Any]], plan: Plan) -> list[str]:
    """The pass/fail lines the issue asks for, computed from the results."""
    lines = []

    def mark(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    for name, summary in summaries.items():
        for row in summary["rows"]:
            kt = row["kt"]["lds"]
            where = f"{name} M={row['M']} k={row['k']}"
            if "best" not in row:
                lines.append(f"- SKIP {where}: traker not run (see above)")
                continue
            best = row["best"]["lds"]
            lines.append(
                f"- {mark(kt >= best - 0.01)} {where}: kerntrace default {kt:.3f} "
                f"≥ traker best-of-grid {best:.3f} − 0.01"
            )
            default = row["default"]["lds"]
            collapsed = not math.isfinite(default) or default < best - 0.10
            if collapsed:
                shown = _fmt(default)
                floor = default if math.isfinite(default) else -1.0
                lines.append(
                    f"- {mark(kt >= floor + 0.10)}"
                    f" {where}: traker default collapses ({shown}, more than 0.10 "
                    f"below its best {best:.3f}); kerntrace {kt:.3f} ≥ it + 0.10"
                )
        by_m: dict[int, list[tuple[int, float]]] = {}
        for row in summary["rows"]:
            by_m.setdefault(row["M"], []).append((row["k"], row["kt"]["lds"]))
        for m, pairs in by_m.items():
            pairs.sort()
            values = [v for _, v in pairs]
            ok = all(b >= a for a, b in zip(values, values[1:], strict=False))
            chain = " → ".join(f"{v:.3f} (k={k})" for k, v in pairs)
            lines.append(
                f"- {mark(ok)} {name} M={m}: kerntrace LDS never falls as k grows: "
                f"{chain}"
            )
        for row in summary["projectors"]:
            values = row["lds"]
            spread = max(values.values()) - min(values.values())
            shown = ", ".join(f"{p} {v:.3f}" for p, v in sorted(values.items()))
            lines.append(
                f"- {mark(spread <= 0.02)} {name} M={row['M']} k={row['k']}: "
                f"projectors within 0.02 of each other ({shown})"
            )
        if name == "digits" and 5 in by_m:
            values = dict(by_m[5])
            lines.append(
                f"- {mark(max(values.values()) >= 0.58)} digits M=5: LDS ≥ 0.58 at "
                f"some k (best {max(values.values()):.3f})"
            )
            for k, v in sorted(values.items()):
                lines.append(
                    f"- {mark(v >= 0.58)} digits M=5 k={k}: LDS {v:.3f} ≥ 0.58"
                )
    return lines


def table(problem: Problem, summary: dict[str, Any], plan: Plan) -> list[str]:
    """The markdown table of one dataset."""
    lines = [
        "| M | k | kerntrace default LDS (95 % CI) | traker default (λ=0) | "
        "traker best-of-grid (λ = c·s) | kerntrace − traker best |",
        "|---:|---:|---|---:|---|---:|",
    ]
    for row in summary["rows"]:
        kt = row["kt"]
        low, high = kt["ci"]
        cell = f"{kt['lds']:.3f} ({low:.3f}–{high:.3f})"
        if "best" not in row:
            lines.append(
                f"| {row['M']} | {row['k']} | {cell} | skipped | skipped | — |"
            )
            continue
        best = row["best"]
        edge = " ⚠ edge" if row["edge"] else ""
        span = f"decades {min(row['decades']):g}…{max(row['decades']):g}"
        tried = f"{row['n_tried']} λ tried, {row['strategy']}, {span}"
        if row["nan_c"]:
            tried += f"; NaN scores at c ≥ {min(row['nan_c']):g}"
        lines.append(
            f"| {row['M']} | {row['k']} | {cell} | {_fmt(row['default']['lds'])} | "
            f"{best['lds']:.3f} (c={row['best_c']:.3g}, λ={best['lambda_reg']:.3g}; "
            f"{tried}){edge} | {kt['lds'] - best['lds']:+.3f} |"
        )
    return lines


def timing(problem: Problem, plan: Plan, results: Results) -> list[str]:
    """Wall times of each tool's featurization per k."""
    lines = [
        "| k | kerntrace: featurize train (10 ckpts) | kerntrace: finalize "
        "features | kerntrace: score targets | traker: featurize train (10 ckpts)"
        " | traker, per checkpoint and λ: finalize features + score targets "
        "(median over its λ runs) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for k in plan.proj_dims:
        kt = results.get(f"kerntrace/k{k}")
        if kt is None:
            lines.append(f"| {k} | not run | | | not run | |")
            continue
        feat = results.get(f"traker/k{k}/featurize") or {}
        if feat.get("skipped"):
            tr = (
                f"skipped: {1e3 * feat['per_example_s']:.1f} ms/example measured, "
                f"≈ {feat['estimate_s'] / 60:.0f} min estimated"
            )
            tr2 = "—"
        else:
            tr = f"{feat.get('featurize_s', float('nan')):.1f} s"
            runs = [
                v
                for key, v in results.data.items()
                if key.startswith(f"traker/k{k}/")
                and isinstance(v, dict)
                and "checkpoints_finalized" in v
            ]
            per_fin = [
                v["finalize_features_s"] / v["checkpoints_finalized"] for v in runs
            ]
            per_score = [
                v["score_targets_s"] / v["checkpoints_finalized"] for v in runs
            ]
            tr2 = (
                f"{np.median(per_fin):.2f} s + {np.median(per_score):.2f} s"
                if runs
                else "—"
            )
        lines.append(
            f"| {k} | {kt['featurize_s']:.1f} s | {kt['finalize_features_s']:.1f} s "
            f"| {kt['score_targets_s']:.1f} s | {tr} | {tr2} |"
        )
    return lines


def write_results(
    problems: dict[str, Problem],
    summaries: dict[str, dict[str, Any]],
    extras: dict[str, dict[str, Any]],
    plan: Plan,
    results_by: dict[str, Results],
    command: str,
    path: Path | None = None,
    cache_roots: dict[str, Path] | None = None,
) -> None:
    """Write the Quality section of RESULTS.md between its markers."""
    from importlib.metadata import version

    out = [
        START,
        "## Quality: LDS of kerntrace vs traker 0.3.2",
        "",
        f"Written by `benchmarks/quality.py` on {datetime.date.today()} "
        f"({platform.machine()}, {os.cpu_count()} CPU cores shared with other "
        f"work, torch {torch.__version__}, traker {version('traker')}, "
        f"kerntrace {kerntrace.__version__}). Command:",
        "",
        f"    {command}",
        "",
        *(
            [
                "`--report-only` rebuilds the tables from the cache; its entries "
                "were computed by earlier runs of the same script without that "
                "flag (`--datasets digits`, then `--datasets fashion`), and the "
                "wall times are those of the runs that computed them.",
                "",
            ]
            if "--report-only" in command
            else []
        ),
        "Every number below is computed by that script from the cache in "
        "`benchmarks/.cache/quality/<dataset>/results.json`: LDS with "
        "`kerntrace.evaluate.lds` (mean over targets of the Spearman "
        "correlation, across subsets, between the summed scores of a subset "
        "and the margin of a model retrained on it; 95 % bootstrap interval "
        "over targets).",
        "",
        "Setup: the training set is featurized once per tool and k with "
        f"{plan.checkpoints} checkpoints (seeds 0..{plan.checkpoints - 1}); the "
        "M-checkpoint scores use the first M of them (kerntrace: "
        "`finalize_scores(model_ids=range(M))`; traker: `finalize_features` "
        "and `finalize_scores` with `model_ids=range(M)`). Ground truth: "
        f"{plan.subsets} random halves (`make_subsets(n, {plan.subsets}, seed=1)`), "
        "subset j retrained with seed 1000 + j. Ceiling: the same subsets "
        "retrained with seeds 5000 + j; mean over targets of the Spearman "
        "correlation between the two retrainings' margins.",
        "",
        "- kerntrace default: `kerntrace.TRAKer(..., proj_dim=k)`, nothing "
        "else: the curvature-weighted kernel ΦᵀRΦ (R = p_y(1 − p_y)), "
        "λ = 0.2 · tr(ΦᵀRΦ)/n per checkpoint, float32 features, "
        "`projector='auto'` (its choice is listed per dataset).",
        "- traker default: `trak.TRAKer(..., device='cpu', proj_dim=k)`, "
        "i.e. `lambda_reg=0`, `use_half_precision=True`, `BasicProjector` "
        "with a Gaussian matrix (traker's CPU choice); "
        "`logging_level=WARNING` only silences it.",
        "- traker best-of-grid: the same with `lambda_reg = c · s`, "
        f"c ∈ {{{', '.join(f'{c:g}' for c in plan.grid)}}}, where s = (k/p) · "
        f"(kerntrace's mean squared feature norm, mean ‖φ‖² over the "
        f"{plan.checkpoints} checkpoints, fixed the first time it is computed) "
        "is traker's mean squared feature norm (traker divides "
        "Pᵀg by √p with unit-variance P, so E‖φ‖² = (k/p)‖g‖²). The best c is "
        "picked per (M, k) on the same targets it is scored on: an "
        "optimistic upper bound for traker. The two half-decades around the "
        "best decade at M=1 are added to the grid. Where the strategy is "
        "'full' every c is scored at every M; where it is 'search' (larger k: "
        "each λ needs traker to finalize again, a k×k float32 inverse per "
        "checkpoint, tens of seconds at k=8192 here, and to re-score the "
        "targets) c is searched at M=1 and only the M=1 optimum is scored at "
        "M>1 (the 'λ tried' count says how many); to fit the time budget the "
        "search may use only the decades c ∈ "
        f"{{{', '.join(f'{c:g}' for c in plan.search_grid)}}} (plus the two "
        "half-decades; each row names the decades it searched), since the "
        "full grid at smaller k put the optimum near "
        "c = 0.3, gave λ=0's result for c ≤ 1e-4 and NaN scores for large c. "
        "⚠ edge marks an optimum at the end of the decades searched.",
        "",
    ]
    for name, problem in problems.items():
        extra = extras[name]
        out += [
            f"### {name}",
            "",
            f"- data: {problem.source}; n_train = {len(problem.train)}, "
            f"n_targets = {len(problem.targets)}, {plan.subsets} subsets of "
            f"{len(problem.train) // 2}",
            f"- training recipe (checkpoints and retraining): "
            f"{problem.recipe.describe()}; p = {_num_params(problem)} "
            f"parameters; checkpoint accuracy on the targets "
            f"{extra['accuracy_min']:.3f}–{extra['accuracy_max']:.3f}",
            f"- ceiling (LDS that seed noise allows): {extra['ceiling']:.3f}",
            f"- batch size {plan.batch} for featurizing and scoring, both tools",
        ]
        kinds = {}
        for k in plan.proj_dims:
            entry = results_by[name].get(_key(k))
            settings = _store(problem, k, cache_roots[name]) / "store.json"
            if entry is not None and "projector" in entry:
                kinds[k] = entry["projector"]
            elif entry is not None and settings.exists():
                kinds[k] = json.loads(settings.read_text())["projector"]
        out.append(
            "- kerntrace's default projector, as recorded in each store's "
            "`store.json`: "
            + ", ".join(f"k={k}: `{v}`" for k, v in kinds.items())
            + " (the default when these entries were computed; a later "
            "default is not re-measured until the kerntrace entries and "
            "stores are removed from the cache); kerntrace source (git HEAD + "
            "working tree) "
            + ", ".join(sorted({str(e) for e in _sources(results_by[name])}))
        )
        missing = [
            k for k in plan.proj_dims if results_by[name].get(f"kerntrace/k{k}") is None
        ]
        if missing:
            out.append(
                f"- **reduced grid**: k = {', '.join(map(str, missing))} not run "
                "on this dataset (time budget of the run)"
            )
        out += [""]
        out += table(problem, summaries[name], plan)
        if summaries[name]["projectors"]:
            out += [
                "",
                "kerntrace's projectors at equal k (same checkpoints, ground "
                "truth and defaults; only `projector=` differs):",
                "",
            ]
            out += projector_table(summaries[name])
        out += ["", "Wall times (this machine, 2 cores shared, under `nice`):", ""]
        out += timing(problem, plan, results_by[name])
        out += [""]
    out += ["### Checks (computed by the script)", ""]
    out += checks(summaries, plan)
    out += [
        "",
        "'Collapses' means traker's default LDS is more than 0.10 below its "
        "own best-of-grid (or undefined).",
        END,
    ]
    path = path or RESULTS
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    block = "\n".join(out)
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
    logger.info("wrote the Quality section of %s", path)


# -- main -------------------------------------------------------------------------


def run_dataset(
    name: str, plan: Plan, cache_root: Path, *, report_only: bool = False
) -> tuple[Problem, dict[str, Any], dict[str, Any], Results]:
    """Everything for one dataset (per k: kerntrace, then traker); returns
    what the report needs. ``report_only`` computes nothing beyond the
    (cached) checkpoints and ground truth."""
    problem = load_problem(name)
    cache = cache_root / name
    cache.mkdir(parents=True, exist_ok=True)
    results = Results(cache / "results.json")
    logger.info(
        "%s: %d train, %d targets, %s",
        name,
        len(problem.train),
        len(problem.targets),
        problem.recipe.describe(),
    )
    paths = checkpoints(problem, plan.checkpoints, cache)
    accuracies = [accuracy(problem, p) for p in paths]
    truth = ground_truth(problem, plan.subsets, cache, 1000)
    _, again = ground_truth(problem, plan.subsets, cache, 5000)
    extra = {
        "ceiling": ceiling(truth[1], again),
        "accuracy_min": min(accuracies),
        "accuracy_max": max(accuracies),
    }
    logger.info("%s: ceiling %.3f, accuracy %s", name, extra["ceiling"], accuracies)
    for k in [] if report_only else plan.proj_dims:
        run_kerntrace(problem, paths, k, plan, truth, cache, results)
        run_traker(problem, paths, k, plan, truth, cache, results)
    for k in [] if report_only else plan.projector_dims:
        for projector in plan.projectors:
            run_kerntrace(problem, paths, k, plan, truth, cache, results, projector)
    return problem, summarize(problem, plan, results), extra, results


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--datasets", nargs="+", default=["digits", "fashion"], choices=DATASETS
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny grid, to check the script"
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="default benchmarks/.cache/quality"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--no-write", action="store_true", help="do not touch RESULTS.md"
    )
    parser.add_argument(
        "--proj-dims", type=int, nargs="+", default=None, help="subset of the k grid"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="compute nothing new; write what the cache holds",
    )
    parser.add_argument(
        "--results", type=Path, default=None, help="default benchmarks/RESULTS.md"
    )
    return parser.parse_args(argv)


DATASETS = ("digits", "fashion")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write the Quality section of RESULTS.md."""
    args = parse(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else Plan()
    if args.proj_dims and not args.report_only:
        plan = dataclasses.replace(plan, proj_dims=tuple(args.proj_dims))
    default_cache = ROOT / ".cache" / ("quality-quick" if args.quick else "quality")
    cache_root = args.cache or default_cache
    problems, summaries, extras, results_by = {}, {}, {}, {}
    for name in args.datasets:
        problem, summary, extra, results = run_dataset(
            name, plan, cache_root, report_only=args.report_only
        )
        problems[name], summaries[name] = problem, summary
        extras[name], results_by[name] = extra, results
    lines = checks(summaries, plan)
    sys.stderr.write("\n".join(lines) + "\n")
    if not args.no_write and (args.results or not args.quick):
        command = "nice .venv/bin/python benchmarks/quality.py " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
        roots = {name: cache_root / name for name in problems}
        write_results(
            problems, summaries, extras, plan, results_by, command, args.results, roots
        )
    elif args.quick:
        for name in problems:
            sys.stderr.write("\n".join(table(problems[name], summaries[name], plan)))
            sys.stderr.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
