"""Frozen-feature evaluation: kNN, linear probe, retrieval, keypoint matching."""
