"""Datasets: text, prompt/response and chat JSONL (``chat`` names the modules it is made of),
building from a spec, inspecting."""
