"""Synthetic ground-truth cohorts on real MNI152 anatomy: the embedded default data of NeuroMoE."""

from neuromoe.data.synth.cohort import synth_cohort
from neuromoe.data.synth.quicklook import quicklook

__all__ = ["quicklook", "synth_cohort"]
