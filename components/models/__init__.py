"""Backbones, heads and EMA helpers shared by methods."""
