"""Built-in dataset formats."""

from kdcore.data.datasets import JsonlConfig, JsonlDataset, TextConfig, TextDataset
from kdcore.registry.components import Component
from kdcore.registry.manager import hookimpl


@hookimpl
def kd_datasets():
    return [
        Component("text", TextDataset, TextConfig, doc="a UTF-8 text file, next-token windows"),
        Component(
            "jsonl", JsonlDataset, JsonlConfig, doc="prompt/response JSONL, loss on responses"
        ),
    ]
