"""GGUF files (llama.cpp, Ollama, LM Studio) in and out: ``read`` their headers,
``convert`` one to an mlx-lm folder (``kd import``), build its ``tokenizer`` files,
``export`` a student back to GGUF (``kd export --gguf``)."""
