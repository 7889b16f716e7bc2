"""File I/O: NIfTI images, subject tables (manifests and BIDS), atomic writes."""

from neuromoe.io.nifti import MAX_VOXELS, Image, inspect_nifti, load_nifti, resample_to_grid, save_nifti
from neuromoe.io.table import ROLES, load_table, validate_table

__all__ = ["MAX_VOXELS", "ROLES", "Image", "inspect_nifti", "load_nifti", "load_table", "resample_to_grid",
           "save_nifti", "validate_table"]
