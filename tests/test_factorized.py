"""Factorized per-layer projection and hook-captured per-example gradients.

Exactness against a plain autograd loop (identity factors), agreement with
the dense projection in expectation, JL guarantees, the fallback for models
the hooks cannot see through, and the ``auto`` projector's choice.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import kerntrace as kt
from kerntrace import factorized
from kerntrace.factorized import (
    CapturedGradients,
    FactorizedProjector,
    factorized_share,
)
from kerntrace.featurize import Featurizer
from kerntrace.gradients import select_parameters
from kerntrace.outputs import ClassificationTask, classification_margin, get_task
from kerntrace.projection import DenseProjector


class EmbeddingBag(nn.Module):
    """Token ids → summed embeddings (with padding) → LayerNorm → head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(13, 5, padding_idx=0)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(tokens).sum(1)))


class WeightOutsideForward(nn.Module):
    """Uses its layer's weight through F.linear as well: invisible to hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x)) + nn.functional.linear(x, self.fc.weight)
        return self.head(h)


class VariedConvs(nn.Module):
    """Convs with stride, dilation, a non-square kernel and 'same' padding."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), dilation=(1, 2), padding=1)
        self.second = nn.Conv2d(3, 4, 3, padding="same", bias=False)
        self.head = nn.Linear(4 * 5 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.second(torch.tanh(self.first(x))))
        return self.head(h.flatten(1))


class WideConvs(nn.Module):
    """Convs with 4 and 6 input channels, which take the grouped-backward path."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(1, 4, 3, padding=1)
        self.second = nn.Conv2d(
            4, 6, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 2)
        )
        self.third = nn.Conv2d(6, 5, 3, padding="same", bias=False)
        self.head = nn.Linear(5 * 4 * 10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.second(torch.relu(self.first(x))))
        return self.head(torch.tanh(self.third(h)).flatten(1))


class OverPositions(nn.Module):
    """A Linear layer applied at every position of a (B, T, d) sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(x)).mean(1))


def _models(make_mlp, make_cnn, make_shared_linear, make_classification):
    x, y = make_classification(6, (4,), dtype=torch.float64)
    images, labels = make_classification(6, (1, 6, 6), dtype=torch.float64)
    varied, _ = make_classification(6, (2, 9, 8), dtype=torch.float64)
    sequences, _ = make_classification(6, (3, 4), dtype=torch.float64)
    small, _ = make_classification(6, (1, 8, 8), dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 13, (6, 4), generator=generator)
    tokens[:, -1] = 0
    torch.manual_seed(0)
    return {
        "mlp": (make_mlp(d_in=4, dtype=torch.float64), (x, y)),
        "cnn": (make_cnn(dtype=torch.float64), (images, labels)),
        "shared": (make_shared_linear(dtype=torch.float64), (x, y)),
        "embedding": (EmbeddingBag().double(), (tokens, y)),
        "convs": (VariedConvs().double(), (varied, y)),
        "positions": (OverPositions().double(), (sequences, y)),
        "wide": (WideConvs().double(), (small, y)),
    }


MODELS = ["mlp", "cnn", "shared", "embedding", "convs", "positions", "wide"]


@pytest.mark.parametrize("name", MODELS)
def test_captured_gradients_equal_the_autograd_loop(
    name, make_mlp, make_cnn, make_shared_linear, make_classification, loop_gradients
):
    model, (x, y) = _models(
        make_mlp, make_cnn, make_shared_linear, make_classification
    )[name]
    layout = select_parameters(model)
    grads, weights = CapturedGradients(model, ClassificationTask(), layout).compute(
        (x, y)
    )
    torch.testing.assert_close(
        grads, loop_gradients(model, x, y), rtol=1e-10, atol=1e-12
    )
    with torch.no_grad():
        margin = classification_margin(model.eval()(x), y)
    torch.testing.assert_close(weights, torch.sigmoid(-margin))


@pytest.mark.parametrize("name", MODELS)
def test_identity_factors_give_the_exact_layer_gradients(
    name, make_mlp, make_cnn, make_shared_linear, make_classification, loop_gradients
):
    model, (x, y) = _models(
        make_mlp, make_cnn, make_shared_linear, make_classification
    )[name]
    layout = select_parameters(model)
    projector = FactorizedProjector(model, layout, 1, seed=0, model_id=0, exact=True)
    features = Featurizer(model, ClassificationTask(), layout, projector)((x, y))[0]
    exact = loop_gradients(model, x, y)
    offsets = dict(zip(layout.names, np.cumsum((0, *layout.sizes)), strict=False))
    sizes = dict(zip(layout.names, layout.sizes, strict=True))
    for layer in projector.layers:
        block = features[:, layer.offset : layer.offset + layer.width]
        block = block.reshape(len(x), layer.k_out, layer.k_in)
        start = offsets[layer.weight]
        weight = exact[:, start : start + sizes[layer.weight]]
        if isinstance(layer.module, nn.Embedding):
            torch.testing.assert_close(
                block.transpose(1, 2).reshape(len(x), -1), weight
            )
            continue
        columns = layer.n_in - (layer.bias is not None)
        torch.testing.assert_close(block[:, :, :columns].reshape(len(x), -1), weight)
        if layer.bias is not None:
            start = offsets[layer.bias]
            torch.testing.assert_close(
                block[:, :, -1], exact[:, start : start + sizes[layer.bias]]
            )
    for norm in projector.norms:
        block = features[:, norm.offset : norm.offset + norm.width]
        names = [n for n in (norm.weight, norm.bias) if n]
        expected = torch.cat(
            [exact[:, offsets[n] : offsets[n] + sizes[n]] for n in names], 1
        )
        torch.testing.assert_close(block, expected)
    rest = [n for n in layout.names if n in projector.rest.names]
    assert rest == list(projector.rest.names)
    if rest:
        tail = features[:, -projector.rest.numel :]
        expected = torch.cat(
            [exact[:, offsets[n] : offsets[n] + sizes[n]] for n in rest], 1
        )
        torch.testing.assert_close(tail, expected)


def _exact_layer_matrix(layer, exact, offsets, sizes, rows):
    """Each example's G (n_out, n_in) of a layer, bias as the last column."""
    start = offsets[layer.weight]
    weight = exact[:, start : start + sizes[layer.weight]]
    if isinstance(layer.module, nn.Embedding):
        return weight.reshape(rows, layer.n_in, layer.n_out).transpose(1, 2)
    columns = layer.n_in - (layer.bias is not None)
    matrix = weight.reshape(rows, layer.n_out, columns)
    if layer.bias is not None:
        start = offsets[layer.bias]
        bias = exact[:, start : start + sizes[layer.bias]]
        matrix = torch.cat([matrix, bias.unsqueeze(-1)], dim=2)
    return matrix


@pytest.mark.parametrize("name", MODELS)
def test_projected_factors_give_p_out_t_g_p_in(
    name,
    make_mlp,
    make_cnn,
    make_shared_linear,
    make_classification,
    loop_gradients,
    monkeypatch,
):
    # A narrow intermediate, so that these small layers get projected factors.
    monkeypatch.setattr(factorized, "MIXING_FACTOR", 4)
    model, (x, y) = _models(
        make_mlp, make_cnn, make_shared_linear, make_classification
    )[name]
    layout = select_parameters(model)
    projector = FactorizedProjector(model, layout, 3, seed=0, model_id=0)
    assert any(la.p_in is not None or la.p_out is not None for la in projector.layers)
    columns, _ = projector.features(model, ClassificationTask(), (x, y))
    assert columns.shape[1] == len(x)
    exact = loop_gradients(model, x, y)
    offsets = dict(zip(layout.names, np.cumsum((0, *layout.sizes)), strict=False))
    sizes = dict(zip(layout.names, layout.sizes, strict=True))
    for layer in projector.layers:
        matrix = _exact_layer_matrix(layer, exact, offsets, sizes, len(x))
        if layer.p_out is not None:
            matrix = layer.p_out.double().T @ matrix
        if layer.p_in is not None:
            matrix = matrix @ layer.p_in.double()
        block = columns[layer.offset : layer.offset + layer.width]
        torch.testing.assert_close(
            block.T.reshape(len(x), layer.k_out, layer.k_in), matrix
        )


class CountingTask(ClassificationTask):
    """Counts the forward passes; ``fresh`` makes out_to_loss copy the inputs."""

    def __init__(self, fresh: bool = False) -> None:
        super().__init__()
        self.fresh, self.calls = fresh, 0

    def _counted(self, model):
        def counted(*args):
            self.calls += 1
            return model(*args)

        return counted

    def output(self, model, batch):
        return super().output(self._counted(model), batch)

    def out_to_loss(self, model, batch):
        if self.fresh:
            batch = (batch[0].clone(), batch[1])
        return super().out_to_loss(self._counted(model), batch)


@pytest.mark.parametrize(("fresh", "forwards"), [(False, 1), (True, 2)])
def test_weights_reuse_the_forward_pass_only_on_the_same_inputs(
    make_mlp, make_classification, fresh, forwards
):
    model = make_mlp(d_in=4, dtype=torch.float64)
    x, y = make_classification(5, (4,), dtype=torch.float64)
    layout = select_parameters(model)
    task = CountingTask(fresh)
    runs = []
    handle = model.register_forward_hook(lambda *_: runs.append(1))
    try:
        _, weights = CapturedGradients(model, task, layout).compute((x, y))
    finally:
        handle.remove()
    assert len(runs) == forwards and task.calls == 2
    with torch.no_grad():
        margin = classification_margin(model.eval()(x), y)
    torch.testing.assert_close(weights, torch.sigmoid(-margin))


class InPlaceTask(ClassificationTask):
    """Scales the inputs in place between the output and the weights."""

    def out_to_loss(self, model, batch):
        batch[0].mul_(2.0)
        return super().out_to_loss(model, batch)


def test_inputs_changed_in_place_are_run_again(make_mlp, make_classification):
    model = make_mlp(d_in=4, dtype=torch.float64)
    x, y = make_classification(5, (4,), dtype=torch.float64)
    layout = select_parameters(model)
    _, weights = CapturedGradients(model, InPlaceTask(), layout).compute((x.clone(), y))
    with torch.no_grad():
        margin = classification_margin(model.eval()(2.0 * x), y)
    torch.testing.assert_close(weights, torch.sigmoid(-margin))


def test_factorized_and_dense_agree_in_expectation(make_mlp, make_classification):
    model = make_mlp(d_in=6, hidden=12, classes=4, dtype=torch.float64)
    x, y = make_classification(5, (6,), classes=4, dtype=torch.float64)
    layout = select_parameters(model)
    task = ClassificationTask()
    exact, _ = CapturedGradients(model, task, layout).compute((x, y))
    true_gram = exact @ exact.T
    grams = {"factorized": 0.0, "dense": 0.0}
    draws = 200
    for seed in range(draws):
        factorized = FactorizedProjector(model, layout, 24, seed=seed, model_id=0)
        features, _ = Featurizer(model, task, layout, factorized)((x, y))
        grams["factorized"] += features @ features.T / draws
        dense = DenseProjector(layout.numel, 24, seed=seed, model_id=0)
        projected = dense.project(exact)
        grams["dense"] += projected @ projected.T / draws
    scale = true_gram.diagonal().mean()
    for name, gram in grams.items():
        error = (gram - true_gram).abs().max() / scale
        assert error < 0.15, (name, float(error))


def test_factorized_features_keep_norms_and_inner_products(
    make_mlp, make_classification
):
    model = make_mlp(d_in=40, hidden=60, classes=5, dtype=torch.float64)
    x, y = make_classification(12, (40,), classes=5, dtype=torch.float64)
    layout = select_parameters(model)
    task = ClassificationTask()
    exact, _ = CapturedGradients(model, task, layout).compute((x, y))
    projector = FactorizedProjector(model, layout, 512, seed=1, model_id=0)
    assert projector.proj_dim == 512
    features, _ = Featurizer(model, task, layout, projector)((x, y))
    ratio = features.norm(dim=1) ** 2 / exact.norm(dim=1) ** 2
    assert torch.all((ratio > 0.7) & (ratio < 1.3)), ratio
    unit = exact / exact.norm(dim=1, keepdim=True)
    cosine = (
        features @ features.T / torch.outer(features.norm(dim=1), features.norm(dim=1))
    )
    assert (cosine - unit @ unit.T).abs().max() < 0.3


def test_factorized_projection_is_seeded_and_batch_invariant(
    make_cnn, make_classification
):
    model = make_cnn()
    x, y = make_classification(9, (1, 6, 6))
    layout = select_parameters(model)
    task = ClassificationTask()

    def features(seed: int, model_id: int, sizes=(9,)) -> torch.Tensor:
        projector = FactorizedProjector(model, layout, 32, seed=seed, model_id=model_id)
        featurizer = Featurizer(model, task, layout, projector)
        parts, start = [], 0
        for size in sizes:
            parts.append(
                featurizer((x[start : start + size], y[start : start + size]))[0]
            )
            start += size
        return torch.cat(parts)

    base = features(0, 0)
    assert torch.equal(base, features(0, 0))
    torch.testing.assert_close(features(0, 0, (1, 3, 5)), base, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(base, features(1, 0))
    assert not torch.allclose(base, features(0, 1))


def test_weight_used_outside_forward_falls_back_to_torch_func(loop_gradients):
    torch.manual_seed(0)
    model = WeightOutsideForward().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    layout = select_parameters(model)
    projector = kt.projection.make_projector(
        "identity", layout.numel, layout.numel, seed=0, model_id=0
    )
    featurizer = Featurizer(model, ClassificationTask(), layout, projector)
    with pytest.warns(RuntimeWarning, match="hooks disagree with torch.func"):
        features, _ = featurizer((x, y))
    torch.testing.assert_close(features, loop_gradients(model, x, y))


def test_auto_projector_is_logged_and_picks_factorized_for_linear_models(
    tmp_path, make_mlp, caplog
):
    model = make_mlp(d_in=4)
    assert factorized_share(model, select_parameters(model)) == 1.0
    with caplog.at_level(logging.INFO, logger="kerntrace"):
        traker = kt.TRAKer(model, "classification", 10, tmp_path, proj_dim=16)
    assert traker.projector_kind == "factorized"
    assert "projector 'auto' chose 'factorized'" in caplog.text


class Scaled(nn.Module):
    """A frozen Linear layer and a trainable elementwise scale it cannot see."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.ones(3))
        self.fc.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x * self.scale)


def test_auto_projector_picks_dense_when_few_parameters_are_in_layers(tmp_path):
    model = Scaled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        traker = kt.TRAKer(model, "classification", 10, tmp_path, proj_dim=2)
    assert traker.projector_kind == "dense"


def test_auto_projector_uses_the_exact_gradients_when_k_reaches_p(tmp_path, make_mlp):
    model = make_mlp(d_in=5, hidden=6, classes=3)  # 57 parameters
    for k, folder in [(57, "equal"), (500, "above")]:
        traker = kt.TRAKer(model, "classification", 10, tmp_path / folder, proj_dim=k)
        assert (traker.projector_kind, traker.proj_dim) == ("identity", 57)
    traker = kt.TRAKer(model, "classification", 10, tmp_path / "below", proj_dim=56)
    assert traker.projector_kind == "factorized"
    explicit = kt.TRAKer(
        model, "classification", 10, tmp_path / "dense", proj_dim=500, projector="dense"
    )
    assert (explicit.projector_kind, explicit.proj_dim) == ("dense", 500)


def test_factorized_scores_match_dense_scores_closely(
    tmp_path, make_mlp, make_classification, run_traker
):
    model = make_mlp(d_in=5, hidden=6, classes=3)
    train = make_classification(30, (5,), seed=1)
    targets = make_classification(4, (5,), seed=2)
    checkpoint = [model.state_dict()]
    exact = run_traker(
        model,
        checkpoint,
        train,
        targets,
        tmp_path / "identity",
        projector="identity",
        lambda_reg=1e-2,
    )
    factorized = run_traker(
        model,
        checkpoint,
        train,
        targets,
        tmp_path / "factor",
        projector="factorized",
        proj_dim=4096,
        lambda_reg=1e-2,
    )
    correlation = np.corrcoef(exact.ravel(), factorized.ravel())[0, 1]
    assert correlation > 0.97, correlation


class ViewsConvOutput(nn.Module):
    """Flattens a conv's output with ``view``, which channels-last refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv(x)))
        return self.head(h.view(h.shape[0], -1))


def test_channels_last_capture_equals_the_standard_format(
    make_cnn, make_classification
):
    model = make_cnn(dtype=torch.float64)
    images, labels = make_classification(6, (1, 6, 6), dtype=torch.float64)
    layout = select_parameters(model)
    layers = FactorizedProjector._find_layers(model, layout)
    layers += factorized._find_norms(model, layout)
    task = ClassificationTask()
    standard = factorized.capture(model, task, (images, labels), layers, False)
    channels_last = factorized.capture(model, task, (images, labels), layers, True)
    calls = channels_last[0]
    conv_grads = [g for la, _, g in calls if isinstance(la.module, nn.Conv2d)]
    assert conv_grads and all(
        g.is_contiguous(memory_format=torch.channels_last) for g in conv_grads
    )
    for (la, a, g), (lb, b, h) in zip(standard[0], channels_last[0], strict=True):
        assert la is lb
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(standard[1], channels_last[1])
    torch.testing.assert_close(standard[2], channels_last[2])


def test_a_forward_refusing_channels_last_falls_back_and_stays_exact(
    make_classification, loop_gradients, caplog
):
    torch.manual_seed(0)
    model = ViewsConvOutput().double().eval()
    with torch.no_grad():
        model.norm.running_var.fill_(2.0)
    images, labels = make_classification(6, (1, 6, 6), dtype=torch.float64)
    layout = select_parameters(model)
    gradients = CapturedGradients(model, ClassificationTask(), layout)
    assert gradients._capture.channels_last
    with caplog.at_level(logging.INFO, logger="kerntrace"):
        first, _ = gradients.compute((images, labels))
        second, _ = gradients.compute((images, labels))
    assert not gradients._capture.channels_last
    assert [r for r in caplog.records if "channels-last" in r.getMessage()]
    exact = loop_gradients(model, images, labels)
    torch.testing.assert_close(first, exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second, exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("projected", [False, True])
def test_grouped_conv_backward_equals_patches_and_a_batched_product(
    monkeypatch, projected
):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 2))
    inputs = torch.randn(4, 6, 9, 8, dtype=torch.float64)
    grad_out = torch.randn(4, 5, *conv.double()(inputs).shape[2:], dtype=torch.float64)
    k_out = 3 if projected else 5
    layer = factorized.FactorLayer(
        "conv", conv, "weight", "bias", 6 * 3 * 2 + 1, 5, 0, 0
    )
    layer.k_in, layer.k_out = layer.n_in, k_out
    if projected:
        layer.p_out = torch.randn(5, k_out)
    results = []
    for channels in (factorized.GROUPED_CHANNELS, range(0)):
        monkeypatch.setattr(factorized, "GROUPED_CHANNELS", channels)
        for accumulate in (False, True):
            target = torch.ones(k_out, layer.k_in, 4, dtype=torch.float64)
            factorized._project_call(layer, inputs, grad_out, target, accumulate)
            results.append(target)
    torch.testing.assert_close(results[0], results[2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[1], results[3], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[1], results[0] + 1)


def test_capture_restores_batch_norm_forward_also_when_the_forward_fails(
    make_cnn, make_classification
):
    model = make_cnn(dtype=torch.float64)
    images, labels = make_classification(6, (1, 6, 6), dtype=torch.float64)
    layout = select_parameters(model)
    layers = FactorizedProjector._find_layers(model, layout)
    task = ClassificationTask()
    factorized.capture(model, task, (images, labels), layers, True)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all("forward" not in vars(m) for m in norms)
    with pytest.raises(RuntimeError):
        factorized.capture(model, task, (images[:, :, :3], labels), layers, True)
    assert all("forward" not in vars(m) for m in norms)
    with torch.no_grad():
        expected = model.eval()(images)
    torch.testing.assert_close(
        factorized.capture(model, task, (images, labels), layers, False)[1],
        classification_margin(expected, labels),
    )


class WideImageNet(nn.Module):
    """A conv net whose activations dwarf its features: 32 channels at 16x16."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 32, 3, padding=1)
        self.second = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32 * 16 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.second(torch.relu(self.first(x))))
        return self.head(h.flatten(1))


def test_chunks_follow_the_measured_activations_within_the_memory_budget(
    tmp_path, caplog
):
    torch.manual_seed(0)
    model = WideImageNet().eval()
    x, y = torch.randn(24, 3, 16, 16), torch.randint(0, 4, (24,))
    features = {}
    for budget in (1 << 30, 4 << 20):
        traker = kt.TRAKer(
            model,
            "image_classification",
            24,
            tmp_path / str(budget),
            proj_dim=64,
            device="cpu",
            memory_bytes=budget,
        )
        traker.load_checkpoint(model.state_dict(), model_id=0)
        with caplog.at_level(logging.INFO, logger="kerntrace"):
            traker.featurize((x, y), num_samples=24)
        traker.flush()
        featurizer = traker._featurizer
        # The second conv's patches alone: 32 · 3 · 3 inputs at 256 positions.
        assert featurizer.row_bytes > 32 * 9 * 256 * 4
        assert featurizer.chunk_rows == max(1, budget // featurizer.row_bytes)
        features[budget] = np.load(tmp_path / str(budget) / "models/0/features.npy")
    assert traker._featurizer.chunk_rows < 24
    assert [r for r in caplog.records if "featurizing in chunks of" in r.getMessage()]
    # Chunking changes only the order of float32 sums: agreement to rounding,
    # relative to the features' scale (a near-zero entry may differ by 1e-6).
    whole = features[1 << 30]
    np.testing.assert_allclose(
        features[4 << 20], whole, rtol=1e-4, atol=1e-6 * np.abs(whole).max()
    )


class OneConv(nn.Module):
    """A 3-channel conv and a linear head over ``inputs`` features."""

    def __init__(self, inputs: int = 3 * 6 * 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(inputs, 3)


class AssertsContiguous(OneConv):
    """Refuses a channels-last activation with an AssertionError."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))
        assert h.is_contiguous(), "needs contiguous"
        return self.head(h.flatten(1))


class LayoutDependent(OneConv):
    """Computes something else on channels-last activations, silently."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))
        flat = h.reshape(len(h), -1) if h.is_contiguous() else h.permute(0, 2, 3, 1)
        return self.head(flat.reshape(len(h), -1))


class ViewsAfterPooling(OneConv):
    """``view`` works channels-last only while the pooled map is 1x1."""

    def __init__(self) -> None:
        super().__init__(inputs=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.tanh(self.conv(x)), 4)
        return self.head(h.view(len(h), -1)[:, :3])


class ScaledNorm(nn.BatchNorm2d):
    """A BatchNorm subclass whose forward goes on after the affine step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2 + 1


class WithScaledNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = ScaledNorm(3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize(
    ("make", "sides"),
    [
        (AssertsContiguous, (6, 6)),
        (LayoutDependent, (6, 6)),
        (ViewsAfterPooling, (4, 8)),
        (WithScaledNorm, (6, 6)),
    ],
    ids=["asserts", "layout-dependent", "later-batch", "norm-subclass"],
)
def test_models_that_channels_last_or_the_norm_hooks_would_get_wrong_stay_exact(
    make, sides, make_classification, loop_gradients
):
    torch.manual_seed(0)
    model = make().double().eval()
    layout = select_parameters(model)
    gradients = CapturedGradients(model, ClassificationTask(), layout)
    for side in sides:
        x, y = make_classification(6, (1, side, side), dtype=torch.float64)
        grads, _ = gradients.compute((x, y))
        exact = loop_gradients(model, x, y)
        torch.testing.assert_close(grads, exact, rtol=1e-9, atol=1e-11)
    if not isinstance(model, WithScaledNorm):
        assert not gradients._capture.channels_last


class SqueezingWeightOutsideForward(WeightOutsideForward):
    """The same misuse in a forward that needs two rows: ``squeeze`` drops B=1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.squeeze())[:, :3]


@pytest.mark.parametrize(
    "model_class", [WeightOutsideForward, SqueezingWeightOutsideForward]
)
def test_factorized_refuses_a_model_whose_weight_is_used_outside_its_layer(
    tmp_path, model_class
):
    torch.manual_seed(0)
    model = model_class()
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    if model_class is SqueezingWeightOutsideForward:
        x = x.unsqueeze(1)
    traker = kt.TRAKer(
        model, "classification", 6, tmp_path, proj_dim=8, projector="factorized"
    )
    traker.load_checkpoint(model.state_dict(), model_id=0)
    with pytest.raises(
        kt.ConfigurationError, match="projector='sparse' or 'dense' and a new save_dir"
    ):
        traker.featurize((x, y), num_samples=6)
    traker.flush()
    assert not np.load(tmp_path / "models/0/done.npy").any()


class WideWeights(nn.Module):
    """A small input through a Linear layer with 16 MiB of weights."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(8, 1 << 12)
        self.head = nn.Linear(1 << 12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.wide(x)))


@pytest.mark.parametrize("model_class", [WideImageNet, WideWeights])
def test_measured_row_bytes_ignore_the_rest_of_a_sliced_batch_and_the_weights(
    model_class,
):
    torch.manual_seed(0)
    model = model_class().eval()
    shape = (3, 16, 16) if model_class is WideImageNet else (8,)
    everything = torch.randn(20_000, *shape)
    labels = torch.randint(0, 3, (20_000,))
    layout = select_parameters(model)
    projector = FactorizedProjector(model, layout, 64, seed=0, model_id=0)
    task = get_task("classification")
    sliced = projector.row_bytes(model, task, (everything[:2], labels[:2]))
    alone = projector.row_bytes(
        model, task, (everything[:2].clone(), labels[:2].clone())
    )
    assert sliced == alone
    # Two rows of activations, never a share of the 20,000 rows or of the
    # 16 MiB weight: a MiB at most per row for these models.
    assert alone < 1 << 20


def test_a_transposed_view_is_measured_by_its_own_rows():
    torch.manual_seed(0)
    model = WideWeights().eval()
    everything = torch.randn(8, 200_000)  # feature-major: examples are columns
    labels = torch.randint(0, 3, (2,))
    layout = select_parameters(model)
    projector = FactorizedProjector(model, layout, 64, seed=0, model_id=0)
    task = get_task("classification")
    view = everything.T[:2]
    assert projector.row_bytes(model, task, (view, labels)) == projector.row_bytes(
        model, task, (view.contiguous(), labels)
    )


def test_a_later_batch_cut_into_chunks_is_logged(tmp_path, caplog):
    torch.manual_seed(0)
    model = WideImageNet().eval()
    x, y = torch.randn(40, 3, 16, 16), torch.randint(0, 4, (40,))
    traker = kt.TRAKer(
        model,
        "image_classification",
        40,
        tmp_path,
        proj_dim=64,
        device="cpu",
        memory_bytes=4 << 20,
    )
    traker.load_checkpoint(model.state_dict(), model_id=0)
    with caplog.at_level(logging.INFO, logger="kerntrace"):
        traker.featurize((x[:2], y[:2]), num_samples=2)
        assert not [r for r in caplog.records if "in chunks of" in r.getMessage()]
        traker.featurize((x[2:], y[2:]), num_samples=38)
    assert traker._featurizer.chunk_rows < 38
    assert [r for r in caplog.records if "in chunks of" in r.getMessage()]
