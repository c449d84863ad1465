"""Teacher sources: a saved model folder, an mlx-lm folder, a teacher server (``served``,
with its wire formats in ``wire`` and ``openai``); the cache lives in cache/."""
