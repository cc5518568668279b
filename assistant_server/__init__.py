"""VESSA assistant: LiteMedSAM + MiniLM + template bank, its training and its Ray Serve deployment."""
