"""Built-in dataset formats."""

from kdcore.components import Component
from kdcore.data import JsonlConfig, JsonlDataset, TextConfig, TextDataset
from kdcore.plugins import hookimpl


@hookimpl
def kd_datasets():
    return [
        Component("text", TextDataset, TextConfig, doc="a UTF-8 text file, next-token windows"),
        Component(
            "jsonl", JsonlDataset, JsonlConfig, doc="prompt/response JSONL, loss on responses"
        ),
    ]
