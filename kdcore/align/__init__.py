"""Distillation across vocabularies: retokenizing, token maps, ULD."""
