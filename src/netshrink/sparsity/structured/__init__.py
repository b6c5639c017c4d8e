"""Structured pruning with physical removal: dependency analysis, importance, selection, cut or mask."""
