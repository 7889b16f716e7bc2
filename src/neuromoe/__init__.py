"""NeuroMoE: Mixture-of-Experts foundation models for brain MRI."""

__version__ = "0.1.0"
