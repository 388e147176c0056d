"""Comparison blocks with the same call shape as FFF: dense feedforward, sigma-MoE and PKM."""
