"""Evaluation metrics for generated images (FID, KID) computed from feature arrays."""
