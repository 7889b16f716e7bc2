"""Data: preprocessing, registration, datasets and synthetic cohorts."""
