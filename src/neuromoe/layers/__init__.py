"""Shared neural-network layers: the sparse Mixture-of-Experts layer and its router/losses; instance norm."""

from neuromoe.layers.moe import (
    ExpertMLP,
    ExpertUsage,
    MoELayer,
    MoEOutput,
    RouterOutput,
    RouterStats,
    TopKRouter,
    capacity_keep_mask,
    dispatch_experts,
    load_balancing_loss,
    router_z_loss,
)
from neuromoe.layers.norm import INSTANCE_NORM, InstanceNormGN

__all__ = [
    "INSTANCE_NORM",
    "ExpertMLP",
    "ExpertUsage",
    "InstanceNormGN",
    "MoELayer",
    "MoEOutput",
    "RouterOutput",
    "RouterStats",
    "TopKRouter",
    "capacity_keep_mask",
    "dispatch_experts",
    "load_balancing_loss",
    "router_z_loss",
]
