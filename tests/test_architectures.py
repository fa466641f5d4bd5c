"""The canonical flat layout: what every zoo row's weight vector means."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raysys import architectures
from raysys.config import RaysysError

# (arch, in_channels, num_classes, parameter count); resnet18 is checked for consistency only.
SMALL = [("tetris_ffn", 1, 4, 100), ("cnn_s", 1, 10, 2464), ("cnn_s", 3, 10, 2864), ("cnn_m", 3, 10, 10853)]


@pytest.fixture(scope="module")
def resnet():
    return architectures.build("resnet18", "relu", in_channels=3, num_classes=10)


@pytest.mark.parametrize("arch,channels,classes,count", SMALL)
def test_parameter_counts(arch, channels, classes, count):
    model = architectures.build(arch, in_channels=channels, num_classes=classes)
    assert sum(p.numel() for p in model.parameters()) == count
    assert architectures.layout_of(arch, channels, classes).num_params == count


@pytest.mark.parametrize("arch,channels,classes", [s[:3] for s in SMALL] + [("resnet18", 3, 10)])
def test_layout_matches_state_dict_and_parameters_to_vector(arch, channels, classes):
    model = architectures.build(arch, in_channels=channels, num_classes=classes)
    architectures.init_model(model, "normal", torch.Generator().manual_seed(0))
    layout = architectures.layout_of(arch, channels, classes)
    params = dict(model.named_parameters())
    names = [k for k in model.state_dict() if k in params]  # state_dict order, buffers left out
    assert [t.name for t in layout.tensors] == names
    vec = torch.nn.utils.parameters_to_vector(model.parameters())
    assert layout.num_params == vec.numel()
    offset = 0
    for t in layout.tensors:
        assert t.offset == offset and t.shape == tuple(params[t.name].shape)
        torch.testing.assert_close(vec[t.offset:t.offset + t.numel].view(t.shape), params[t.name].detach(), rtol=0, atol=0)
        offset += t.numel
    assert architectures.Layout.from_dict(layout.to_dict()) == layout


@settings(max_examples=15, deadline=None)
@given(arch=st.sampled_from([s[:3] for s in SMALL]), seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_flatten_unflatten_is_identity(arch, seed, scale):
    name, channels, classes = arch
    model = architectures.build(name, in_channels=channels, num_classes=classes)
    n = architectures.layout_of(name, channels, classes).num_params
    vec = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    back = architectures.flatten(architectures.unflatten(vec.clone(), model))
    assert torch.equal(back, vec)
    # ... and the other way round: a model's parameters survive flatten -> unflatten into a fresh model.
    fresh = architectures.unflatten(back, architectures.build(name, in_channels=channels, num_classes=classes))
    for (k, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), k


def test_flatten_unflatten_resnet18(resnet):
    n = sum(p.numel() for p in resnet.parameters())
    vec = torch.randn(n, generator=torch.Generator().manual_seed(1))
    assert torch.equal(architectures.flatten(architectures.unflatten(vec, resnet)), vec)


@settings(max_examples=10, deadline=None)
@given(arch=st.sampled_from([s[:3] for s in SMALL]), lead=st.lists(st.integers(1, 3), max_size=2), seed=st.integers(0, 1000))
def test_split_join_round_trip(arch, lead, seed):
    layout = architectures.layout_of(*arch)
    vecs = torch.randn(*lead, layout.num_params, generator=torch.Generator().manual_seed(seed))
    parts = architectures.split_vector(vecs, layout)
    assert list(parts) == [t.name for t in layout.tensors]
    for t in layout.tensors:
        assert parts[t.name].shape == (*lead, *t.shape)
    assert torch.equal(architectures.join_tensors(parts, layout), vecs)


@pytest.mark.parametrize("arch,channels,classes", [s[:3] for s in SMALL])
def test_wrong_length_vector_is_a_clear_error(arch, channels, classes):
    model = architectures.build(arch, in_channels=channels, num_classes=classes)
    n = architectures.layout_of(arch, channels, classes).num_params
    for bad in (n - 1, n + 7):
        with pytest.raises(RaysysError, match=rf"has {bad} values but the model has {n} parameters"):
            architectures.unflatten(torch.zeros(bad), model)


def test_unknown_architecture_and_activation_are_clear_errors():
    with pytest.raises(RaysysError, match="unknown architecture 'cnn_xl'.*cnn_s"):
        architectures.build("cnn_xl")
    with pytest.raises(RaysysError, match="unknown activation 'swish'.*relu"):
        architectures.build("cnn_s", "swish")
