"""Datasets: text and prompt/response JSONL, building from a spec, inspecting."""
