"""Novelty: nearest-training-model distance (raw, permutation-aligned), agreement, diversity."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raysys import align, architectures
from raysys.config import RaysysError
from raysys.populations import novelty


def population(arch: str, n: int, seed: int = 0, num_classes: int = 10) -> tuple[np.ndarray, architectures.Layout]:
    layout = architectures.layout_of(arch, 1, num_classes)
    out = []
    for i in range(n):
        m = architectures.build(arch, "tanh", 0.0, 1, num_classes)
        architectures.init_model(m, "kaiming_uniform", torch.Generator().manual_seed(seed + i))
        out.append(architectures.flatten(m).numpy())
    return np.stack(out), layout


def random_perms(layout, seed):
    rng = np.random.default_rng(seed)
    return [rng.permutation(l.out_units) for l in layout.layers[:-1]]


@pytest.mark.parametrize("arch", ["tetris_ffn", "cnn_s"])
def test_permutation_preserves_function(arch):
    W, layout = population(arch, 1, num_classes=4 if arch == "tetris_ffn" else 10)
    Wp = align.permute_units(W[0], layout, random_perms(layout, 1))
    x = torch.rand(16, 1, layout.image_size, layout.image_size)
    a = architectures.unflatten(torch.as_tensor(W[0]), architectures.build(arch, "tanh", 0, 1, layout.num_classes))
    b = architectures.unflatten(Wp, architectures.build(arch, "tanh", 0, 1, layout.num_classes))
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)
    assert (Wp - torch.as_tensor(W[0])).norm() > 0.1


@given(seed=st.integers(0, 10 ** 6), which=st.integers(0, 7))
@settings(max_examples=12, deadline=None)
def test_aligned_distance_of_permuted_copy_is_zero(seed, which):
    """cnn_s: conv->conv->conv->flatten(blocks of 9 columns per channel)->fc->fc."""
    W, layout = population("cnn_s", 8, seed=seed % 1000)
    copy = align.permute_units(W[which], layout, random_perms(layout, seed)).numpy()
    near = novelty.nearest(copy[None], W, layout, align=True)
    assert near["raw"][0] > 1.0  # a permuted copy looks far away in raw weight space
    assert near["aligned"][0] < 1e-4
    assert near["aligned_index"][0] == which


def test_copied_training_model_has_zero_novelty_and_full_agreement(digits):
    W, layout = population("cnn_s", 6, seed=3)
    gen = np.stack([W[2], align.permute_units(W[4], layout, random_perms(layout, 9)).numpy()])
    res = novelty.novelty(gen, W, layout, digits.x_test[:200], "tanh")
    per = res["per_model"]
    assert per["nearest_raw"][0] == pytest.approx(0.0, abs=1e-5)
    assert per["nearest_aligned"][0] == pytest.approx(0.0, abs=1e-5)
    assert per["nearest_raw_index"][0] == 2
    assert per["nearest_aligned"][1] == pytest.approx(0.0, abs=1e-4) and per["nearest_raw"][1] > 1.0
    assert per["nearest_aligned_index"][1] == 4
    assert per["agreement"] == [1.0, 1.0]  # a permuted copy predicts exactly like its original
    s = res["summary"]
    assert s["diversity_raw_mean"] > 1.0 and s["diversity_aligned_mean"] <= s["diversity_raw_mean"] + 1e-6


def test_noise_moves_models_away_in_proportion():
    W, layout = population("tetris_ffn", 10, seed=5, num_classes=4)
    rng = np.random.default_rng(0)
    d = []
    for sigma in (0.01, 0.1):
        noisy = W[:5] + sigma * rng.standard_normal(W[:5].shape)
        near = novelty.nearest(noisy, W, layout)
        d.append(near["aligned"].mean())
        # Expected L2 of isotropic noise: sigma * sqrt(P); alignment can only find something closer.
        assert np.all(near["aligned"] <= near["raw"] + 1e-6)
        assert near["raw"].mean() == pytest.approx(sigma * np.sqrt(layout.num_params), rel=0.2)
    assert d[1] > 5 * d[0]


def test_pairwise_diversity_counts_and_zero_for_clones():
    W, layout = population("tetris_ffn", 5, num_classes=4)
    assert len(novelty.pairwise(W)) == 10
    clones = np.repeat(W[:1], 4, axis=0)
    assert np.allclose(novelty.pairwise(clones), 0.0)
    assert np.allclose(novelty.pairwise(clones, layout, align=True), 0.0, atol=1e-6)
    raw, aligned = novelty.pairwise(W), novelty.pairwise(W, layout, align=True)
    assert np.all(aligned <= raw + 1e-5)


def test_non_chain_and_mismatched_shapes_are_clear_errors():
    layout = architectures.layout_of("resnet18", 3, 10)
    with pytest.raises(RaysysError, match="align=False"):
        align.align_to(np.zeros(layout.num_params), np.zeros((1, layout.num_params)), layout)
    W, lay = population("tetris_ffn", 2, num_classes=4)
    with pytest.raises(RaysysError, match="same architecture"):
        novelty.nearest(W, np.zeros((3, 50)), lay)


def test_diverged_models_are_counted_not_averaged(digits):
    W, layout = population("cnn_s", 4, seed=11)
    gen = W[:3].copy()
    gen[1, 5] = np.nan
    res = novelty.novelty(gen, W, layout, digits.x_test[:50], "tanh")
    per, s = res["per_model"], res["summary"]
    assert np.isnan(per["nearest_raw"][1]) and per["nearest_aligned_index"][1] == -1
    assert s["non_finite_models"] == 1
    assert s["nearest_raw_mean"] == pytest.approx(0.0, abs=1e-5) and s["agreement_mean"] == 1.0
