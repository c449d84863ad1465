"""Teacher sources: a saved model folder, an mlx-lm folder (the cache lives in cache/)."""
