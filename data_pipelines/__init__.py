"""Data: record schema, dataset builders, views, per-modality preprocessing, grain pipeline."""
