"""Data layer: SCAN precomp reader, tokenizer, noise, prepared format, pipeline."""
