"""Backbones, the set encoder and the mask generator."""
