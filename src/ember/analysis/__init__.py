"""Model analysis: per-op quantization sensitivity (KL, dispersion, spectral energy, skewness, perplexity)."""
