"""Data layer: preparation tools, tokenization, streaming readers, SFT records."""
