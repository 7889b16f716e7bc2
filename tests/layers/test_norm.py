"""InstanceNormGN: the function of InstanceNorm with affine weights, and its weights interchangeable."""

import pytest
import torch
from monai.networks.layers.utils import get_norm_layer

from neuromoe.layers.norm import INSTANCE_NORM, InstanceNormGN


@pytest.mark.parametrize("dims", [2, 3])
def test_equals_instance_norm_forward_backward_and_loads_its_weights(dims: int) -> None:
    torch.manual_seed(0)
    ref = get_norm_layer(("INSTANCE", {"affine": True}), spatial_dims=dims, channels=6)
    ours = get_norm_layer(INSTANCE_NORM, spatial_dims=dims, channels=6)
    assert isinstance(ours, InstanceNormGN)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    ours.load_state_dict(ref.state_dict(), strict=True)  # models saved with InstanceNorm load unchanged
    x = (3 * torch.randn(4, 6, *[9] * dims) + 2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    a, b = ref(x), ours(x2)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    a.pow(2).sum().backward()
    b.pow(2).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_input_gives_the_same_values_grads_and_layout(dims: int) -> None:
    """The channels-last path (normalised in the default layout) is the same function and keeps the layout
    the next convolution expects."""
    torch.manual_seed(0)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    norm = InstanceNormGN(5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = (2 * torch.randn(3, 5, *[7] * dims) + 1).requires_grad_()
    xc = x.detach().contiguous(memory_format=fmt).requires_grad_()
    ref = torch.nn.functional.group_norm(x, 5, norm.weight, norm.bias, norm.eps)
    out = norm(xc)
    assert out.is_contiguous(memory_format=fmt) and not out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (x, norm.weight, norm.bias), g)
    got = torch.autograd.grad(out, (xc, norm.weight, norm.bias), g.contiguous(memory_format=fmt))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
