"""Flax reference CNNs whose conv layers expose kernels, pre-activations and patches."""
