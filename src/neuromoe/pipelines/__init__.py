"""Importable pipelines: one module per model family (pretrain/train/evaluate/predict/demo) and the core demo."""
