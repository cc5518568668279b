"""Code that both sides of VESSA import: configuration, data layer, metrics, wire formats."""
