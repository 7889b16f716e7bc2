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
