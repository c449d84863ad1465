"""Tokenizers: bytes, characters and Hugging Face tokenizer.json."""
