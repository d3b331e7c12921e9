"""What the run leaves for its users: final/ (weights, tokenizer, card, curves) with its manifest,
per-step metrics in the store, and `status`, read from the store alone."""
