"""Model quality evaluation (perplexity)."""
