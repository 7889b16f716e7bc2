"""File I/O: NIfTI images, subject tables (manifests and BIDS), atomic writes."""

from neuromoe.io.nifti import MAX_VOXELS, Image, inspect_nifti, load_nifti, resample_to_grid, save_nifti

__all__ = ["MAX_VOXELS", "Image", "inspect_nifti", "load_nifti", "resample_to_grid", "save_nifti"]
