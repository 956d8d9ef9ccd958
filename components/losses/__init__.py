"""Losses as pure functions of tensors, each tested against its paper's formula."""
