"""Episodic meta-learning of the set encoder and mask generator (single process)."""
