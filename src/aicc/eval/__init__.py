"""Model quality: perplexity of a text, and the comparison of two models on it."""
