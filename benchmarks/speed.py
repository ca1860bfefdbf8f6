"""Featurization speed and peak memory of kerntrace against ``traker`` 0.3.2.

For three models (the digits MLP 64-256-256-10, an MLP 784-128-10 and the
small CNN on MNIST images) and k ∈ {2048, 8192}, this script measures how
many train examples per second each tool featurizes in steady state, and
the peak resident memory of doing so:

- kerntrace's ``TRAKer.featurize`` with each projector: ``"auto"`` (the
  default the library ships; its choice is logged and recorded),
  ``"dense"``, ``"sparse"`` and ``"factorized"``;
- ``traker`` 0.3.2's ``TRAKer.featurize`` on the CPU, where it uses its
  Gaussian ``BasicProjector``, with its default float16 arithmetic, with
  ``use_half_precision=False``, and with float32 in a process given the
  malloc setting kerntrace makes (``kerntrace.heap``), so that no ratio
  comes from the heap alone;
- the gradient floor: kerntrace's per-example gradients alone
  (``PerExampleGradients.compute``, ``torch.func`` vmap, no projection), and
  one plain batched forward and backward pass as a lower bound, both with
  kerntrace's malloc setting.

Every configuration runs in its own subprocess on 2 CPU threads (``--threads``
changes that), so that its peak RSS (``ru_maxrss`` read at the end of the
child) is its own. The first batch is excluded from the throughput: it is
reported, together with the tool's construction and checkpoint loading, as
a one-time cost.
Configurations run in ``--rounds`` interleaved rounds (default 3): every
round runs each configuration once, with its share of ``--budget`` seconds,
in alternating order, and a configuration's rates pool the batches of all
its rounds, so that a slow spell of a shared machine does not fall on one
tool alone. A child whose timed batches pass its share stops there, once at
least 300 examples are timed, or once they pass five times its share
(traker's float16 projection on a CPU without fast float16 arithmetic runs
at a few examples per second); the tables say how many were timed.

The models keep their seeded random initialization: featurization speed
does not depend on training. The inputs are real digits
(``kerntrace.data``). The tables, machine facts and pass/fail lines go
between the ``speed`` markers of ``benchmarks/RESULTS.md``; nothing else in
that file is touched.

Run ``python benchmarks/speed.py [--quick]``. ``--quick`` times a few
batches of each configuration and writes nothing unless ``--results PATH``
is given.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "RESULTS.md"
START, END = "<!-- speed:start -->", "<!-- speed:end -->"
THREADS = 2
BATCH = 100
MIN_TIMED = 300
SLOW_CAP = 5  # times the budget after which even a slow tool stops
KS = (2048, 8192)
RESULT_TAG = "SPEED-RESULT "

logger = logging.getLogger("speed")


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model and its data.

    Attributes:
        key: Short name used on the command line.
        title: Heading of its table.
        dataset: ``"digits"`` or ``"mnist5k"``.
        n: Number of train examples featurized.
    """

    key: str
    title: str
    dataset: str
    n: int


MODELS = (
    ModelSpec("digits-mlp", "Digits MLP 64-256-256-10", "digits", 1200),
    ModelSpec("mnist-mlp", "MNIST MLP 784-128-10", "mnist5k", 2000),
    ModelSpec("mnist-cnn", "MNIST SmallCNN(side=28)", "mnist5k", 2000),
)

PROJECTED_TOOLS = (
    "kerntrace-auto",
    "kerntrace-dense",
    "kerntrace-sparse",
    "kerntrace-factorized",
    "traker-fp16",
    "traker-fp32",
    "traker-fp32-heap",
)
FLOOR_TOOLS = ("floor-per-example", "floor-batched")

LABELS = {
    "kerntrace-auto": "kerntrace `auto` (default)",
    "kerntrace-dense": "kerntrace `dense`",
    "kerntrace-sparse": "kerntrace `sparse`",
    "kerntrace-factorized": "kerntrace `factorized`",
    "traker-fp16": "traker 0.3.2 (default, float16)",
    "traker-fp32": "traker 0.3.2 (`use_half_precision=False`)",
    "traker-fp32-heap": "traker 0.3.2 (float32, kerntrace's malloc setting)",
    "floor-per-example": "floor: per-example gradients (vmap), no projection",
    "floor-batched": "reference: one batched forward + backward",
}


@dataclass(frozen=True)
class Config:
    """One measurement, run in its own subprocess.

    Attributes:
        model: A ``ModelSpec.key``.
        tool: One of ``PROJECTED_TOOLS`` or ``FLOOR_TOOLS``.
        k: Requested projection dimension (0 for the floors).
        n: Train examples available.
        budget: Seconds of timed batches after which the run may stop.
        threads: Intra-op threads of the child (``torch.set_num_threads``).
    """

    model: str
    tool: str
    k: int
    n: int
    budget: float
    threads: int = THREADS


# -- the child: one measurement ------------------------------------------


def _rss_mib() -> float:
    """Current resident set size of this process in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _source_hash() -> str:
    """A short hash of kerntrace's source files, to see if they changed."""
    import kerntrace

    digest = hashlib.sha256()
    for path in sorted(Path(kerntrace.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:10]


def _model_and_data(spec: ModelSpec, n: int) -> tuple[Any, Any, Any]:
    """The seeded, untrained model in eval mode, inputs (n, d) and labels (n,)."""
    import numpy as np
    import torch

    from kerntrace import data, models

    source = data.load_digits() if spec.dataset == "digits" else data.load_mnist5k()
    order = np.random.default_rng(0).permutation(len(source))[:n]
    x = torch.from_numpy(source.x[order].copy())
    y = torch.from_numpy(source.y[order].copy())
    if spec.key == "digits-mlp":
        model = models.mlp((64, 256, 256, 10), seed=0)
    elif spec.key == "mnist-mlp":
        model = models.mlp((784, 128, 10), seed=0)
    else:
        model = models.SmallCNN(side=28, seed=0)
    return model.eval(), x, y


class _Recorder(logging.Handler):
    """Keeps the messages kerntrace logs about its projector."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "projector" in message or "projection" in message:
            self.messages.append(message)


Step = Callable[[tuple[Any, Any]], None]


def _kerntrace_step(
    model: Any, n: int, k: int, projector: str, folder: str
) -> tuple[Step, dict[str, Any]]:
    import kerntrace

    recorder = _Recorder()
    library_logger = logging.getLogger("kerntrace")
    library_logger.addHandler(recorder)
    library_logger.setLevel(logging.INFO)
    traker = kerntrace.TRAKer(
        model,
        "image_classification",
        n,
        folder,
        proj_dim=k,
        projector=projector,
        device="cpu",
    )
    traker.load_checkpoint(model.state_dict(), model_id=0)

    def step(batch: tuple[Any, Any]) -> None:
        traker.featurize(batch, num_samples=len(batch[0]))

    info = {
        "chosen": traker.projector_kind,
        "k_actual": traker.proj_dim,
        "log": recorder.messages,
    }
    return step, info


def _traker_step(
    model: Any, n: int, k: int, half: bool, folder: str
) -> tuple[Step, dict[str, Any]]:
    import trak

    traker = trak.TRAKer(
        model=model,
        task="image_classification",
        train_set_size=n,
        save_dir=folder,
        device="cpu",
        proj_dim=k,
        use_half_precision=half,
        logging_level=logging.WARNING,
    )
    traker.load_checkpoint(model.state_dict(), model_id=0)

    def step(batch: tuple[Any, Any]) -> None:
        traker.featurize(batch=batch, num_samples=len(batch[0]))

    info = {
        "chosen": type(traker.projector).__name__,
        "k_actual": traker.proj_dim,
        "log": [],
    }
    return step, info


def _floor_step(model: Any, batched: bool) -> tuple[Step, dict[str, Any]]:
    import torch

    from kerntrace.gradients import PerExampleGradients, select_parameters
    from kerntrace.outputs import get_task

    task = get_task("image_classification")
    if not batched:
        gradients = PerExampleGradients(model, task, select_parameters(model))

        def step(batch: tuple[Any, Any]) -> None:
            gradients.compute(batch)

        return _heap_kept(step), {"chosen": "none", "k_actual": 0, "log": []}
    params = [p for p in model.parameters() if p.requires_grad]

    def batched_step(batch: tuple[Any, Any]) -> None:
        torch.autograd.grad(task.output(model, batch).sum(), params)

    return _heap_kept(batched_step), {"chosen": "none", "k_actual": 0, "log": []}


def _heap_kept(step: Step) -> Step:
    """``step`` with the malloc setting ``TRAKer.featurize`` uses per batch.

    The floors and one traker row get it, so that no ratio against them
    comes from the heap alone.
    """
    from kerntrace.heap import reusing_freed_blocks

    def kept(batch: tuple[Any, Any]) -> None:
        with reusing_freed_blocks():
            step(batch)

    return kept


def _time_batches(
    step: Step, batches: Sequence[tuple[Any, Any]], budget: float
) -> dict[str, Any]:
    """Time each batch; stop past ``budget`` once MIN_TIMED rows are timed.

    A tool so slow that MIN_TIMED rows would take over ``SLOW_CAP`` budgets
    stops there, with at least one timed batch.

    The rate is from the median time per example over the batches after the
    first, which is robust to the stalls a shared machine causes; the mean
    rate and the ratio of the last third's time to the first third's
    (``growth``, > 1 if batches get slower as rows accumulate) are kept too.
    """
    seconds: list[float] = []
    rows: list[int] = []
    cpu_start = time.process_time()
    wall_start = time.perf_counter()
    for batch in batches:
        start = time.perf_counter()
        step(batch)
        seconds.append(time.perf_counter() - start)
        rows.append(len(batch[0]))
        timed = sum(seconds[1:])
        if timed > budget and (sum(rows[1:]) >= MIN_TIMED or timed > SLOW_CAP * budget):
            break
    wall = time.perf_counter() - wall_start
    timed_rows, timed_seconds = sum(rows[1:]), sum(seconds[1:])
    per_example = sorted(s / r for s, r in zip(seconds[1:], rows[1:], strict=True))
    median = statistics.median(per_example) if per_example else float("nan")
    third = max(1, len(per_example) // 3)
    in_order = [s / r for s, r in zip(seconds[1:], rows[1:], strict=True)]
    return {
        "first_batch_s": seconds[0],
        "first_excess_s": max(0.0, seconds[0] - median * rows[0]),
        "timed_examples": timed_rows,
        "timed_s": timed_seconds,
        "rate": 1.0 / median,
        "rate_best": 1.0 / per_example[0] if per_example else float("nan"),
        "rate_mean": timed_rows / timed_seconds if timed_seconds > 0 else 0.0,
        "growth": statistics.mean(in_order[-third:])
        / statistics.mean(in_order[:third]),
        "batch_s": seconds,
        "per_example_s": in_order,
        "batches": len(seconds),
        "cpu_per_wall": (time.process_time() - cpu_start) / wall,
    }


def run_child(config: Config) -> dict[str, Any]:
    """Measure one configuration in this process and return its results."""
    import torch

    torch.set_num_threads(config.threads)
    spec = next(m for m in MODELS if m.key == config.model)
    model, x, y = _model_and_data(spec, config.n)
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, config.n, BATCH)]
    base = _rss_mib()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kerntrace-speed-") as folder:
        start = time.perf_counter()
        if config.tool.startswith("kerntrace-"):
            projector = config.tool.removeprefix("kerntrace-")
            step, info = _kerntrace_step(model, config.n, config.k, projector, folder)
        elif config.tool.startswith("traker-"):
            half = config.tool == "traker-fp16"
            step, info = _traker_step(model, config.n, config.k, half, folder)
            if config.tool.endswith("-heap"):
                step = _heap_kept(step)
        else:
            step, info = _floor_step(model, config.tool == "floor-batched")
        setup = time.perf_counter() - start
        timing = _time_batches(step, batches, config.budget)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        **asdict(config),
        **info,
        **timing,
        "setup_s": setup,
        "one_time_s": setup + timing["first_excess_s"],
        "base_rss_mib": base,
        "peak_rss_mib": peak,
        "parameters": sum(p.numel() for p in model.parameters()),
        "load_before": load_start,
        "load_after": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "source": _source_hash(),
    }


# -- the parent: run every configuration, write the tables ---------------


def merge_rounds(children: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's result from its children of several rounds.

    The per-example times of every child's timed batches are pooled, so the
    median and best rates are over all rounds; counts add up, peak RSS is
    the largest, one-time costs and loads are the median and the largest.
    A child that failed makes the whole configuration fail.
    """
    failed = [c for c in children if "error" in c]
    if failed:
        return failed[0]
    if len(children) == 1:
        return {**children[0], "rounds": 1}
    pooled = sorted(t for c in children for t in c["per_example_s"])
    timed_rows = sum(c["timed_examples"] for c in children)
    timed_seconds = sum(c["timed_s"] for c in children)
    merged = dict(children[0])
    sources = list(dict.fromkeys(c["source"] for c in children))
    merged.update(
        rounds=len(children),
        budget=sum(c["budget"] for c in children),
        rate=1.0 / statistics.median(pooled),
        rate_best=1.0 / pooled[0],
        rate_mean=timed_rows / timed_seconds if timed_seconds > 0 else 0.0,
        rate_rounds=[c["rate"] for c in children],
        timed_examples=timed_rows,
        timed_s=timed_seconds,
        batches=sum(c["batches"] for c in children),
        batch_s=[t for c in children for t in c["batch_s"]],
        per_example_s=[t for c in children for t in c["per_example_s"]],
        growth=statistics.mean(c["growth"] for c in children),
        cpu_per_wall=statistics.mean(c["cpu_per_wall"] for c in children),
        one_time_s=statistics.median(c["one_time_s"] for c in children),
        setup_s=statistics.median(c["setup_s"] for c in children),
        first_batch_s=statistics.median(c["first_batch_s"] for c in children),
        peak_rss_mib=max(c["peak_rss_mib"] for c in children),
        base_rss_mib=statistics.median(c["base_rss_mib"] for c in children),
        load_before=max(c["load_before"] for c in children),
        load_after=max(c["load_after"] for c in children),
        source=sources[0] if len(sources) == 1 else "+".join(sources),
    )
    return merged


def _spawn(config: Config, timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(config.threads),
        MKL_NUM_THREADS=str(config.threads),
        HF_HUB_OFFLINE="1",
        PYTHONWARNINGS="ignore",
    )
    command = [sys.executable, str(Path(__file__).resolve()), "--child"]
    try:
        done = subprocess.run(
            [*command, json.dumps(asdict(config))],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {**asdict(config), "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line.removeprefix(RESULT_TAG))
    tail = " | ".join(done.stderr.strip().splitlines()[-3:])
    return {**asdict(config), "error": f"exit {done.returncode}: {tail}"}


def _configs(args: argparse.Namespace) -> list[Config]:
    configs = []
    for spec in MODELS:
        if spec.key not in args.models:
            continue
        n = min(spec.n, args.examples) if args.examples else spec.n
        for k in args.ks:
            for tool in args.tools:
                if tool in PROJECTED_TOOLS:
                    configs.append(
                        Config(spec.key, tool, k, n, args.budget, args.threads)
                    )
        for tool in args.tools:
            if tool in FLOOR_TOOLS:
                configs.append(Config(spec.key, tool, 0, n, args.budget, args.threads))
    return configs


def _describe(result: dict[str, Any]) -> str:
    head = f"{result['model']:<11} {result['tool']:<21} k={result['k']:<5}"
    if "error" in result:
        return f"{head} ERROR {result['error']}"
    return (
        f"{head} {result['rate']:9.1f} ex/s on {result['timed_examples']:>4} "
        f"timed, one-time {result['one_time_s']:6.2f} s, peak "
        f"{result['peak_rss_mib']:7.1f} MiB, chose {result['chosen']}, "
        f"cpu/wall {result['cpu_per_wall']:.2f}, load {result['load_before']:.1f}"
    )


def _machine() -> dict[str, Any]:
    import torch

    import kerntrace

    model_name = platform.processor() or "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    commit, dirty = "unknown", ""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout.strip()
        dirty = " with uncommitted changes in src/" if status else ""
    except OSError:
        pass
    try:
        from importlib.metadata import version

        trak_version = version("traker")
    except Exception:  # noqa: BLE001 - any failure just means "unknown"
        trak_version = "not installed"
    return {
        "cores": os.cpu_count(),
        "cpu": model_name,
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kerntrace": f"{kerntrace.__version__} (git {commit}{dirty})",
        "traker": trak_version,
    }


def _fmt_rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _fmt_ratio(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}×" if value >= 1 else f"{value:.2f}×"


def _ok(result: dict[str, Any] | None) -> bool:
    return result is not None and "error" not in result


def _find(results: list[dict], model: str, tool: str, k: int) -> dict | None:
    for result in results:
        if (result["model"], result["tool"], result["k"]) == (model, tool, k):
            return result
    return None


def _traker_reference(
    results: list[dict], model: str, k: int, key: str = "rate"
) -> float | None:
    """The fastest of traker's variants at this k: the conservative baseline."""
    rates = [
        r.get(key, r["rate"])
        for tool in ("traker-fp16", "traker-fp32", "traker-fp32-heap")
        if _ok(r := _find(results, model, tool, k))
    ]
    return max(rates) if rates else None


def _table(results: list[dict], spec: ModelSpec) -> list[str]:
    mine = [r for r in results if r["model"] == spec.key]
    if not mine:
        return []
    parameters = next((r["parameters"] for r in mine if _ok(r)), 0)
    n = mine[0]["n"]
    floor = _find(results, spec.key, "floor-per-example", 0)
    floor_rate = floor["rate"] if _ok(floor) else None
    lines = [
        f"### {spec.title} ({parameters:,} parameters, {n:,} real "
        f"{'digits' if spec.dataset == 'digits' else 'MNIST digits'})",
        "",
    ]
    auto = [r for r in mine if r["tool"] == "kerntrace-auto" and _ok(r)]
    if auto:
        chosen = ", ".join(sorted({r["chosen"] for r in auto}))
        lines += [f"`auto` chose **{chosen}**; kerntrace logged (INFO):", ""]
        for result in auto:
            said = [m for m in result["log"] if not m.startswith("TRAKer:")]
            quoted = "; ".join(f"`{m}`" for m in said)
            lines.append(f"- k = {result['k']:,}: {quoted}")
        lines.append("")
    lines += [
        "| tool / projector | k | examples/s | best ex/s | × traker | × floor "
        "| timed examples | one-time s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in mine:
        label = LABELS[result["tool"]]
        if not _ok(result):
            lines.append(
                f"| {label} | {result['k'] or '—'} | error: "
                f"{result['error'][:60]} | | | | | | |"
            )
            continue
        k = result["k"]
        shown_k = "—" if k == 0 else f"{result['k_actual']:,}"
        reference = _traker_reference(results, spec.key, k) if k else None
        to_traker = result["rate"] / reference if reference else None
        to_floor = result["rate"] / floor_rate if floor_rate else None
        lines.append(
            f"| {label} | {shown_k} | {_fmt_rate(result['rate'])} | "
            f"{_fmt_rate(result.get('rate_best', result['rate']))} | "
            f"{_fmt_ratio(to_traker)} | {_fmt_ratio(to_floor)} | "
            f"{result['timed_examples']:,} | {result['one_time_s']:.2f} | "
            f"{result['peak_rss_mib']:,.0f} |"
        )
    base = min((r["base_rss_mib"] for r in mine if _ok(r)), default=0.0)
    lines += [
        "",
        f"Each child holds about {base:,.0f} MiB before the tool is built "
        "(Python, torch, the data); peak RSS includes it.",
        "",
    ]
    return lines


GOALS = (
    ("digits-mlp", "traker", 20.0),
    ("mnist-cnn", "traker", 10.0),
    ("digits-mlp", "floor", 1.0),
    ("mnist-mlp", "floor", 1.0),
)


def _goal_lines(results: list[dict]) -> list[str]:
    titles = {m.key: m.title for m in MODELS}
    lines = []
    for model, against, factor in GOALS:
        auto = _find(results, model, "kerntrace-auto", 2048)
        floor = _find(results, model, "floor-per-example", 0)
        references = {}
        for key in ("rate", "rate_best"):
            if against == "traker":
                references[key] = _traker_reference(results, model, 2048, key)
            elif _ok(floor):
                references[key] = floor.get(key, floor["rate"])
        what = (
            f"≥ {factor:.0f}× traker"
            if against == "traker"
            else "≥ the per-example gradient floor"
        )
        if not _ok(auto) or not references.get("rate"):
            lines.append(f"- **n/a** {titles[model]}, `auto`, k = 2,048: {what}")
            continue
        ratio = auto["rate"] / references["rate"]
        best = auto.get("rate_best", auto["rate"]) / references["rate_best"]
        verdict = "PASS" if ratio >= factor else "FAIL"
        lines.append(
            f"- **{verdict}** {titles[model]}, `auto` ({auto['chosen']}), "
            f"k = 2,048: {what} — measured {ratio:.1f}× "
            f"({_fmt_rate(auto['rate'])} vs {_fmt_rate(references['rate'])} "
            f"examples/s; on best batches {best:.1f}×)"
        )
    return lines


def _source_note(results: list[dict]) -> str:
    versions = list(dict.fromkeys(r["source"] for r in results if "source" in r))
    if len(versions) <= 1:
        return (
            "- kerntrace's source files were the same for every configuration "
            f"(hash {versions[0] if versions else 'unknown'})."
        )
    changed = [
        f"{r['model']} {r['tool']} k={r['k']}"
        for before, r in zip(results, results[1:], strict=False)
        if "source" in r and r["source"] != before.get("source")
    ]
    return (
        f"- kerntrace's source changed during the run ({len(versions)} "
        f"versions; new code from: {', '.join(changed)}); rows before and "
        "after a change measure different code."
    )


def _rounds(results: list[dict]) -> int:
    return max((r.get("rounds", 1) for r in results if _ok(r)), default=1)


def _share(results: list[dict]) -> float:
    ok = [r for r in results if _ok(r)]
    return ok[0]["budget"] / ok[0].get("rounds", 1) if ok else 0.0


def render(
    results: list[dict], machine: dict, command: str, wall: float, quick: bool
) -> str:
    """The Speed section of RESULTS.md, markers included."""
    date = datetime.datetime.now(datetime.timezone.utc)
    loads = [r["load_before"] for r in results if _ok(r)]
    cpu = [r["cpu_per_wall"] for r in results if _ok(r)]
    counts = sorted({r["threads"] for r in results if _ok(r)}) or [THREADS]
    threads = "/".join(map(str, counts))
    cut = sorted(
        {
            f"{r['model']} {r['tool']} k={r['k']}"
            for r in results
            if _ok(r) and r["timed_examples"] < r.get("rounds", 1) * (r["n"] - BATCH)
        }
    )
    lines = [
        START,
        "## Speed",
        "",
        "Featurization throughput (train examples per second, steady state) "
        "and peak RSS, measured by `benchmarks/speed.py`"
        + (" in its `--quick` mode (few examples; not a result)." if quick else "."),
        "",
        f"- Command: `{command}` — the whole run took {wall / 60:.1f} min.",
        f"- Date: {date:%Y-%m-%d %H:%M} UTC. Machine: {machine['cores']} cores "
        f"({machine['cpu']}), {machine['memory_gib']:.0f} GiB RAM; Python "
        f"{machine['python']}, torch {machine['torch']}, kerntrace "
        f"{machine['kerntrace']}, traker {machine['traker']}.",
        f"- Every configuration ran in its own subprocess with "
        f"`torch.set_num_threads({threads})`, batch size {BATCH} for every "
        "tool, float32 models. The machine was shared: the 1-minute load "
        f"average at the start of the children ranged {min(loads, default=0):.1f}"
        f"–{max(loads, default=0):.1f} on {machine['cores']} cores, and the "
        f"children got {min(cpu, default=0):.2f}–{max(cpu, default=0):.2f} "
        "CPU-seconds per second, so absolute numbers are noisy; the ratios "
        "within a table are the result.",
        "- Models are untrained (seeded random initialization); featurization "
        "speed does not depend on the weights. Inputs are real digits.",
        "- examples/s is the batch size over the median wall time of the "
        "batches after the first (robust to the stalls of a shared machine); "
        "best ex/s uses the fastest such batch, closer to what an idle machine "
        "gives (tools timed on fewer batches get fewer tries at it). The "
        "first batch, the "
        "tool's construction and the checkpoint load make the one-time cost "
        "(for `dense` it includes drawing the matrix). × traker divides by "
        "the fastest of the traker rows at the same k (the conservative "
        "baseline); × floor divides by the "
        "per-example gradient row. k is the dimension produced.",
        "- traker 0.3.2 runs on the CPU with `device='cpu'`, where it picks "
        "its `BasicProjector` (Gaussian, regenerated block by block for every "
        "batch). kerntrace rows are the full `TRAKer.featurize`, store writes "
        "included.",
        f"- Each configuration ran in {_rounds(results)} interleaved "
        "round(s) (every configuration once per round, in alternating order, "
        "so that a slow spell of the shared machine falls on all of them); "
        "the rates pool the batches of all rounds. In each round a child stops "
        "once its timed batches pass "
        f"{_share(results):.1f} s and at least {MIN_TIMED} examples are timed "
        f"(or they pass {SLOW_CAP}× that); "
        "the `timed examples` column says how many were timed in all"
        + (f" (cut short: {', '.join(cut)})." if cut else " (none was cut)."),
        "",
        _source_note(results),
        "",
        "Goals (default projector `auto`, k = 2,048; verdict on the median rates):",
        "",
        *_goal_lines(results),
        "",
    ]
    for spec in MODELS:
        lines += _table(results, spec)
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace the text between the speed markers; append them if absent."""
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        before, rest = text.split(START, 1)
        _, after = rest.split(END, 1)
        new = before + section.rstrip("\n") + after
    else:
        new = text + ("\n" if text and not text.endswith("\n") else "")
        new += ("\n" if text else "") + section
    tmp = path.with_name(f".{path.name}.speed.{os.getpid()}.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few batches each")
    parser.add_argument(
        "--models",
        nargs="+",
        default=[m.key for m in MODELS],
        choices=[m.key for m in MODELS],
    )
    parser.add_argument(
        "--tools",
        nargs="+",
        default=[*PROJECTED_TOOLS, *FLOOR_TOOLS],
        choices=[*PROJECTED_TOOLS, *FLOOR_TOOLS],
    )
    parser.add_argument("--ks", nargs="+", type=int, default=list(KS))
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timed batches per configuration (default 45, quick 5)",
    )
    parser.add_argument("--examples", type=int, default=None, help="cap on n")
    parser.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help=f"intra-op threads of every child (default {THREADS})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds; each configuration's budget is split "
        "among them (default 3, quick 1)",
    )
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="raw results")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = 5.0 if args.quick else 45.0
    if args.quick and args.examples is None:
        args.examples = 400
    if args.quick and "--rounds" not in (argv if argv is not None else sys.argv):
        args.rounds = 1
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.results is None and not args.quick:
        args.results = RESULTS
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run every configuration side by side and write the Speed section."""
    args = parse(argv)
    if args.child is not None:
        result = run_child(Config(**json.loads(args.child)))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = " ".join([".venv/bin/python benchmarks/speed.py", *sys.argv[1:]])
    started = time.perf_counter()
    configs = _configs(args)
    logger.info(
        "%d configurations, budget %.0f s each in %d interleaved rounds",
        len(configs),
        args.budget,
        args.rounds,
    )
    # Every round runs every configuration once, with a share of its budget,
    # in alternating order, so that a slow spell of the machine falls on all
    # of them alike instead of on whichever ran then.
    share = [replace(c, budget=c.budget / args.rounds) for c in configs]
    children: list[list[dict[str, Any]]] = [[] for _ in configs]
    for round_index in range(args.rounds):
        order = list(range(len(configs)))
        if round_index % 2:
            order.reverse()
        for i in order:
            result = _spawn(share[i], timeout=4 * share[i].budget + 600)
            logger.info("round %d: %s", round_index + 1, _describe(result))
            children[i].append(result)
    results = [merge_rounds(c) for c in children]
    wall = time.perf_counter() - started
    logger.info("all done in %.1f min", wall / 60)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    section = render(results, _machine(), command, wall, args.quick)
    print(section)
    if args.results is not None:
        write_section(args.results, section)
        logger.info("wrote the Speed section of %s", args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
