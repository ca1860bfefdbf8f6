"""A self-contained HTML page showing what drove each target's prediction.

For every target the page shows the target, its top-k proponents (training
examples with the largest scores, which push the target's output up) and its
top-k opponents (the most negative scores). Images are drawn as embedded PNG
pictures, text is shown as text. A histogram of the scores, the LDS and the
settings of the run complete the page. The file has no external resources,
so it can be mailed or opened offline, on a phone or a desktop.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import pathlib
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kerntrace.data import Dataset

__all__ = ["Example", "examples_from_dataset", "write_report"]

logger = logging.getLogger(__name__)

_MIN_IMAGE_PIXELS = 64  # images are enlarged to at least this many pixels a side
_MAX_TEXT_CHARS = 2000


@dataclass(frozen=True, eq=False)
class Example:
    """One training example or target, as the report shows it.

    Attributes:
        index: For a training example, its row in ``scores``; for a target,
            its column in ``scores``.
        label: Its label as text, for example a class name.
        image: Optional grayscale picture, float array of shape (h, w) with
            values in [0, 1]; 0 is drawn white and 1 black.
        text: Optional text, shown when there is no image.
    """

    index: int
    label: str
    image: np.ndarray | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.index, bool) or not isinstance(self.index, int | np.integer):
            raise ValueError(f"Example.index must be an integer; got {self.index!r}")
        if self.index < 0:
            raise ValueError(f"Example.index must be >= 0; got {self.index}")
        object.__setattr__(self, "index", int(self.index))
        object.__setattr__(self, "label", str(self.label))
        if self.image is not None:
            image = np.asarray(self.image, dtype=np.float64)
            if image.ndim != 2 or 0 in image.shape:
                raise ValueError(
                    "Example.image must be a grayscale array of shape (h, w); "
                    f"got shape {image.shape} for example {self.index}"
                )
            if not (np.all(image >= 0.0) and np.all(image <= 1.0)):
                raise ValueError(
                    f"Example.image must hold values in [0, 1] (no NaN); got "
                    f"{np.nanmin(image)} to {np.nanmax(image)} for example "
                    f"{self.index}"
                )
            object.__setattr__(self, "image", image)
        if self.text is not None:
            object.__setattr__(self, "text", str(self.text))


def examples_from_dataset(
    dataset: Dataset, *, indices: Sequence[int] | np.ndarray | None = None
) -> list[Example]:
    """Make report examples from a dataset, labelled with its class names.

    Args:
        dataset: The examples to show, of n rows. Images are used when it has
            an ``image_shape``.
        indices: Rows of ``dataset`` to take, of shape (m,); all n rows in
            order when ``None``. Example ``j`` gets ``index = j``, its
            position in this list, which is its row (for training examples)
            or column (for targets) in the scores.

    Returns:
        A list of m ``Example``.
    """
    rows = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    images = dataset.images() if dataset.image_shape is not None else None
    examples = []
    for position, row in enumerate(rows.tolist()):
        if not 0 <= row < len(dataset):
            raise ValueError(
                f"indices must lie in [0, {len(dataset)}); got {row} at "
                f"position {position}"
            )
        examples.append(
            Example(
                index=position,
                label=dataset.classes[int(dataset.y[row])],
                image=None if images is None else images[row],
            )
        )
    return examples


def write_report(
    path: str | os.PathLike[str],
    *,
    scores: np.ndarray,
    train: Sequence[Example],
    targets: Sequence[Example],
    k: int = 5,
    title: str = "kerntrace report",
    lds: float | None = None,
    lds_interval: tuple[float, float] | None = None,
    settings: Mapping[str, object] | None = None,
) -> pathlib.Path:
    """Write the HTML report of a run's scores.

    Args:
        path: The HTML file to write. Its folder is created if needed; the
            file is replaced atomically, so a reader never sees half a page.
        scores: Attribution scores, shape (n_train, n_targets_total), any real
            dtype (a memmap is fine: only the targets' columns are read).
            ``scores[i, j]`` is the score of training example i for target j.
        train: All n_train training examples, ``train[i].index == i``.
        targets: The targets to show, each with ``index`` its column in
            ``scores``; any subset of the columns, in the order to show.
        k: How many proponents and how many opponents to show per target, in
            ``[1, n_train]``. Ties are broken by the lower training index.
        title: Page title.
        lds: Linear datamodeling score of the run, if measured.
        lds_interval: ``(low, high)`` confidence interval of ``lds``.
        settings: Settings of the run to list in a table, for example
            ``{"proj_dim": 2048, "lambda": 0.1}``; values are shown with
            ``str``.

    Returns:
        The path of the written file.

    Raises:
        ValueError: If ``scores`` is not 2-D or holds NaN or infinity in a
            shown column, ``train`` does not match its rows, a target's index
            is not a column, ``k`` is out of range, or ``lds_interval`` is
            malformed or given without ``lds``.
    """
    columns, selected = _check_inputs(scores, train, targets, k)
    _check_lds(lds, lds_interval)

    sections = [
        _target_section(target, selected[:, position], train, k)
        for position, target in enumerate(targets)
    ]
    page = _page(
        title=title,
        summary=_summary(selected, columns, len(train), k, lds, lds_interval),
        settings=settings or {},
        sections=sections,
    )

    destination = pathlib.Path(path)
    _write_atomically(destination, page)
    logger.info("wrote report of %d targets (k=%d) to %s", len(targets), k, destination)
    return destination


def _check_inputs(
    scores: np.ndarray,
    train: Sequence[Example],
    targets: Sequence[Example],
    k: int,
) -> tuple[list[int], np.ndarray]:
    """Validate the inputs; return the target columns and their float64 scores."""
    if getattr(scores, "ndim", None) is None:
        scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(
            "scores must have shape (n_train, n_targets); got shape "
            f"{tuple(scores.shape)}"
        )
    n_train, n_columns = (int(side) for side in scores.shape)
    if len(train) != n_train:
        raise ValueError(
            f"train must hold one Example per row of scores ({n_train}); got "
            f"{len(train)}"
        )
    for row, example in enumerate(train):
        if example.index != row:
            raise ValueError(
                f"train[{row}].index must be {row} (its row in scores); got "
                f"{example.index}"
            )
    if len(targets) == 0:
        raise ValueError("targets must hold at least one Example; got none")
    columns = [target.index for target in targets]
    bad = [column for column in columns if column >= n_columns]
    if bad:
        raise ValueError(
            f"target indices must be columns of scores, in [0, {n_columns}); "
            f"got {bad[:5]}"
        )
    if (
        isinstance(k, bool)
        or not isinstance(k, int | np.integer)
        or not (1 <= k <= n_train)
    ):
        raise ValueError(f"k must be an integer in [1, {n_train}]; got {k!r}")

    selected = np.asarray(scores[:, columns], dtype=np.float64)
    if not np.all(np.isfinite(selected)):
        raise ValueError(
            "scores must be finite; the shown columns hold "
            f"{int(np.count_nonzero(~np.isfinite(selected)))} NaN or infinite "
            "values"
        )
    return columns, selected


def _check_lds(lds: float | None, interval: tuple[float, float] | None) -> None:
    if lds is not None and not math.isfinite(float(lds)):
        raise ValueError(f"lds must be a finite number or None; got {lds!r}")
    if interval is None:
        return
    if lds is None:
        raise ValueError("lds_interval was given without lds; pass lds too")
    if len(interval) != 2:
        raise ValueError(f"lds_interval must be (low, high); got {interval!r}")
    low, high = (float(bound) for bound in interval)
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(
            f"lds_interval must be finite with low <= high; got {interval!r}"
        )


def _ranked(column: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the rows of the k largest and the k smallest scores."""
    proponents = np.argsort(-column, kind="stable")[:k]
    opponents = np.argsort(column, kind="stable")[:k]
    return proponents, opponents


def _target_section(
    target: Example, column: np.ndarray, train: Sequence[Example], k: int
) -> str:
    proponents, opponents = _ranked(column, k)
    rows = []
    for kind, heading, ranked in (
        ("proponents", "Proponents (push the output up)", proponents),
        ("opponents", "Opponents (push the output down)", opponents),
    ):
        cards = "".join(
            _card(
                train[row],
                caption=f"train #{row}",
                score=float(column[row]),
                same_label=train[row].label == target.label,
            )
            for row in ranked.tolist()
        )
        rows.append(
            f'<div class="{kind}"><h3>{heading}</h3>'
            f'<div class="cards">{cards}</div></div>'
        )
    target_card = _card(target, caption=f"target #{target.index}")
    return (
        f'<section class="target" id="target-{target.index}">'
        f"<h2>Target #{target.index}: {html.escape(target.label)}</h2>"
        f'<div class="layout"><div class="query">{target_card}</div>'
        f'<div class="ranked">{"".join(rows)}</div></div></section>'
    )


def _card(
    example: Example,
    *,
    caption: str,
    score: float | None = None,
    same_label: bool = False,
) -> str:
    if example.image is not None:
        body = (
            f'<img src="data:image/png;base64,{_image_png(example.image)}" '
            f'alt="{html.escape(caption)}: {html.escape(example.label)}">'
        )
    elif example.text is not None:
        text = example.text
        if len(text) > _MAX_TEXT_CHARS:
            text = text[:_MAX_TEXT_CHARS] + " …"
        body = f'<p class="text">{html.escape(text)}</p>'
    else:
        body = ""
    score_line = "" if score is None else f'<span class="score">{score:+.4g}</span>'
    css = (
        "card"
        + (" same" if same_label else "")
        + (" wide" if example.image is None else "")
    )
    return (
        f'<figure class="{css}" data-index="{example.index}">{body}'
        f"<figcaption><span>{html.escape(caption)}</span>"
        f'<span class="label">{html.escape(example.label)}</span>'
        f"{score_line}</figcaption></figure>"
    )


def _image_png(image: np.ndarray) -> str:
    """Encode a (h, w) image in [0, 1] as base64 PNG, enlarged by repetition."""
    from matplotlib.image import imsave

    scale = max(1, math.ceil(_MIN_IMAGE_PIXELS / max(image.shape)))
    enlarged = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    buffer = io.BytesIO()
    imsave(buffer, enlarged, cmap="gray_r", vmin=0.0, vmax=1.0, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _histogram_png(values: np.ndarray) -> str:
    """Plot a histogram of ``values`` and return it as base64 PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 2.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.hist(values, bins=min(100, max(10, values.size // 20)), color="#3b6ea5")
    axes.axvline(0.0, color="#555555", linewidth=0.8)
    if values.size >= 1000:
        axes.set_yscale("log")
    axes.set_xlabel("score")
    axes.set_ylabel("count (log scale)" if values.size >= 1000 else "count")
    axes.set_title("Scores of all training examples for the shown targets")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _summary(
    selected: np.ndarray,
    columns: list[int],
    n_train: int,
    k: int,
    lds: float | None,
    interval: tuple[float, float] | None,
) -> str:
    facts = [
        ("training examples", f"{n_train:,}"),
        ("targets shown", f"{len(columns):,}"),
        ("proponents and opponents per target", str(k)),
        ("score range", f"{selected.min():+.4g} to {selected.max():+.4g}"),
    ]
    if lds is not None:
        text = f"{float(lds):.3f}"
        if interval is not None:
            text += f" (interval {float(interval[0]):.3f} to {float(interval[1]):.3f})"
        facts.insert(0, ("LDS", text))
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>"
        for name, value in facts
    )
    picture = (
        f'<img class="plot" src="data:image/png;base64,'
        f'{_histogram_png(selected.ravel())}" alt="histogram of the scores">'
    )
    legend = (
        '<p class="legend">A green border marks a training example with the '
        "same label as its target. Scores are shown with their sign.</p>"
    )
    return f'<table class="facts">{rows}</table>{picture}{legend}'


def _page(
    *, title: str, summary: str, settings: Mapping[str, object], sections: list[str]
) -> str:
    settings_rows = "".join(
        f"<tr><th>{html.escape(str(name))}</th><td>{html.escape(str(value))}</td></tr>"
        for name, value in settings.items()
    )
    settings_html = (
        f'<h2>Settings</h2><table class="settings">{settings_rows}</table>'
        if settings_rows
        else ""
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><header><h1>{html.escape(title)}</h1></header>"
        f'<main><section class="summary">{summary}{settings_html}</section>'
        f"{''.join(sections)}</main></body></html>\n"
    )


def _write_atomically(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise


_CSS = """
*{box-sizing:border-box}
body{margin:0;font:15px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;
color:#1d1d1f;background:#f5f5f7}
header{background:#24344d;color:#fff;padding:12px 16px}
h1{margin:0;font-size:1.4em}
h2{font-size:1.15em;margin:0 0 8px}
h3{font-size:.95em;margin:8px 0 4px;color:#444}
main{max-width:1200px;margin:0 auto;padding:12px}
section{background:#fff;border-radius:8px;padding:12px;margin:0 0 12px;
box-shadow:0 1px 3px rgba(0,0,0,.12)}
table{border-collapse:collapse;margin:0 0 12px;max-width:100%}
th,td{text-align:left;padding:3px 10px 3px 0;border-bottom:1px solid #eee;
vertical-align:top;overflow-wrap:anywhere}
th{font-weight:600}
img.plot{display:block;width:100%;max-width:640px;height:auto}
.layout{display:flex;flex-wrap:wrap;gap:12px}
.query{flex:0 0 auto}
.ranked{flex:1 1 300px;min-width:0}
.cards{display:flex;flex-wrap:wrap;gap:8px}
.card{margin:0;padding:6px;width:108px;border:2px solid #ddd;border-radius:6px;
background:#fafafa}
.card.wide{width:220px}
.query .card{width:140px;border-color:#24344d}
.query .card.wide{width:260px}
.card.same{border-color:#9bc59d}
.card img{display:block;width:100%;height:auto;image-rendering:pixelated;
image-rendering:crisp-edges}
.query .card img{image-rendering:pixelated}
.card .text{margin:0;max-height:9em;overflow:auto;font-size:.85em;
white-space:pre-wrap;overflow-wrap:anywhere}
figcaption{display:flex;flex-direction:column;font-size:.8em;margin-top:4px}
.label{font-weight:600;overflow-wrap:anywhere}
.legend{font-size:.85em;color:#555}
.score{font-variant-numeric:tabular-nums;color:#555}
.proponents .score{color:#1b7a2e}
.opponents .score{color:#b3261e}
@media (max-width:520px){.card{width:calc(33% - 6px)}
.card.wide,.query .card.wide{width:100%}.query .card{width:160px}
main{padding:6px}}
"""
