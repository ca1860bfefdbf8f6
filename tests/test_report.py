"""Tests of the HTML report writer in kerntrace.report."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from kerntrace.data import Dataset, load_digits
from kerntrace.report import Example, examples_from_dataset, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _images(n: int, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [
        Example(index=i, label=f"class {i % 3}", image=rng.random((8, 8)))
        for i in range(n)
    ]


def _sections(page: str) -> dict[int, str]:
    parts = re.split(r'<section class="target" id="target-(\d+)">', page)
    return {
        int(index): body for index, body in zip(parts[1::2], parts[2::2], strict=True)
    }


def _card_indices(block: str) -> list[int]:
    return [int(index) for index in re.findall(r'data-index="(\d+)"', block)]


def _ranked_blocks(section: str) -> tuple[str, str]:
    proponents = section.split('<div class="proponents">')[1].split(
        '<div class="opponents">'
    )[0]
    opponents = section.split('<div class="opponents">')[1]
    return proponents, opponents


def test_report_shows_k_proponents_and_opponents_in_score_order(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(30, 6))
    train = _images(30)
    targets = [Example(index=j, label="t", image=np.zeros((8, 8))) for j in (4, 1)]

    path = write_report(
        tmp_path / "report.html", scores=scores, train=train, targets=targets, k=4
    )

    assert path.is_file()
    sections = _sections(path.read_text(encoding="utf-8"))
    assert list(sections) == [4, 1]
    for column, section in sections.items():
        proponents, opponents = _ranked_blocks(section)
        assert _card_indices(proponents) == list(np.argsort(-scores[:, column])[:4])
        assert _card_indices(opponents) == list(np.argsort(scores[:, column])[:4])
        for row in _card_indices(proponents)[:1] + _card_indices(opponents)[:1]:
            assert f"train #{row}<" in section
            assert f"{scores[row, column]:+.4g}" in section


def test_report_images_are_embedded_png(tmp_path):
    digits = load_digits().subset(np.arange(20))
    train = examples_from_dataset(digits)
    targets = examples_from_dataset(digits, indices=[3, 5])
    scores = np.random.default_rng(1).normal(size=(20, 2))

    page = write_report(
        tmp_path / "r.html", scores=scores, train=train, targets=targets, k=3
    ).read_text(encoding="utf-8")

    encoded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # one histogram + per target: the target and 3 + 3 ranked examples
    assert len(encoded) == 1 + 2 * (1 + 3 + 3)
    for text in encoded:
        assert base64.b64decode(text).startswith(PNG_MAGIC)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page


def test_report_images_are_enlarged_to_64_pixels():
    from kerntrace.report import _image_png

    png = base64.b64decode(_image_png(np.eye(8)))

    width = int.from_bytes(png[16:20], "big")
    height = int.from_bytes(png[20:24], "big")
    assert (width, height) == (64, 64)


def test_report_text_examples_are_escaped(tmp_path):
    train = [
        Example(index=0, label="<b>bold</b>", text="<script>alert(1)</script>"),
        Example(index=1, label="plain", text='5 > 3 & "quoted"'),
    ]
    targets = [Example(index=0, label="a&b", text="<i>target</i>")]

    page = write_report(
        tmp_path / "r.html",
        scores=np.array([[1.0], [-1.0]]),
        train=train,
        targets=targets,
        k=1,
        title="<Title>",
        settings={"<key>": "<value>"},
    ).read_text(encoding="utf-8")

    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "5 &gt; 3 &amp; &quot;quoted&quot;" in page
    assert "&lt;i&gt;target&lt;/i&gt;" in page
    assert "<title>&lt;Title&gt;</title>" in page
    assert "&lt;key&gt;" in page and "&lt;value&gt;" in page


def test_report_shows_lds_interval_and_settings(tmp_path):
    page = write_report(
        tmp_path / "r.html",
        scores=np.arange(6.0).reshape(3, 2),
        train=_images(3),
        targets=[Example(index=1, label="t")],
        k=1,
        lds=0.5612,
        lds_interval=(0.51, 0.6),
        settings={"proj_dim": 2048, "lambda": 0.125},
    ).read_text(encoding="utf-8")

    assert "0.561 (interval 0.510 to 0.600)" in page
    assert "<th>proj_dim</th><td>2048</td>" in page
    assert "<th>lambda</th><td>0.125</td>" in page


def test_report_is_written_atomically_into_new_folder(tmp_path):
    path = tmp_path / "deep" / "folder" / "r.html"
    kwargs = dict(
        scores=np.ones((3, 1)), train=_images(3), targets=[Example(0, "t")], k=1
    )

    write_report(path, **kwargs)
    write_report(path, **kwargs, title="second")

    assert "second" in path.read_text(encoding="utf-8")
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.html"]


def test_report_reads_only_target_columns_of_a_memmap(tmp_path):
    scores = np.lib.format.open_memmap(
        tmp_path / "s.npy", mode="w+", dtype=np.float32, shape=(5, 4)
    )
    scores[:] = np.arange(20, dtype=np.float32).reshape(5, 4)
    scores[:, 0] = np.nan  # a column not shown may hold anything

    path = write_report(
        tmp_path / "r.html",
        scores=scores,
        train=_images(5),
        targets=[Example(index=2, label="t")],
        k=2,
    )

    proponents, opponents = _ranked_blocks(_sections(path.read_text())[2])
    assert _card_indices(proponents) == [4, 3]
    assert _card_indices(opponents) == [0, 1]


def test_examples_from_dataset_uses_class_names_and_images():
    dataset = Dataset(
        name="tiny",
        x=np.linspace(0, 1, 12).reshape(3, 4),
        y=np.array([1, 0, 1]),
        classes=("cat", "dog"),
        image_shape=(2, 2),
    )

    examples = examples_from_dataset(dataset, indices=[2, 1])

    assert [e.index for e in examples] == [0, 1]
    assert [e.label for e in examples] == ["dog", "cat"]
    np.testing.assert_allclose(examples[0].image, dataset.images()[2])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\)"):
        examples_from_dataset(dataset, indices=[3])


def _call(**overrides):
    kwargs = dict(
        scores=np.zeros((4, 2)),
        train=_images(4),
        targets=[Example(index=0, label="t")],
        k=2,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scores": np.zeros(4)}, r"scores must have shape \(n_train, n_targets\)"),
        ({"scores": np.zeros((5, 2))}, r"one Example per row of scores \(5\); got 4"),
        ({"train": _images(4)[::-1]}, r"train\[0\]\.index must be 0"),
        ({"targets": [Example(index=2, label="t")]}, r"in \[0, 2\); got \[2\]"),
        ({"targets": []}, "at least one Example"),
        ({"k": 0}, r"k must be an integer in \[1, 4\]; got 0"),
        ({"k": 5}, r"k must be an integer in \[1, 4\]; got 5"),
        ({"scores": np.full((4, 2), np.nan)}, "scores must be finite"),
        ({"lds": float("nan")}, "lds must be a finite number"),
        ({"lds_interval": (0.1, 0.2)}, "lds_interval was given without lds"),
        ({"lds": 0.5, "lds_interval": (0.6, 0.2)}, "low <= high"),
    ],
)
def test_report_rejects_bad_input(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        write_report(tmp_path / "r.html", **_call(**overrides))
    assert not (tmp_path / "r.html").exists()


def test_example_validates_its_image_and_index():
    with pytest.raises(ValueError, match=r"shape \(h, w\); got shape \(8, 8, 3\)"):
        Example(index=0, label="x", image=np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        Example(index=0, label="x", image=np.full((8, 8), 2.0))
    with pytest.raises(ValueError, match="index must be >= 0"):
        Example(index=-1, label="x")
    with pytest.raises(ValueError, match="index must be an integer"):
        Example(index=1.5, label="x")
