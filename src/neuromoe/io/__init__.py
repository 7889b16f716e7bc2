"""File I/O: NIfTI images, subject tables (manifests and BIDS), atomic writes."""
