"""Shared neural-network layers: the sparse Mixture-of-Experts layer and its router/losses."""

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

__all__ = [
    "ExpertMLP",
    "ExpertUsage",
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
