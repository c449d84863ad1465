"""Models: the built-in transformer, the mlx-lm adapter, LoRA, saving and loading."""
