"""On-policy MiniLLM distillation."""


def components():
    return []
