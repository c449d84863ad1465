"""Built-in dataset formats."""

from kdcore.data.chat import ChatConfig, ChatDataset
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
        Component(
            "chat",
            ChatDataset,
            ChatConfig,
            doc="mlx-lm chat/completion/text JSONL in the tokenizer's chat template, "
            "loss on assistant turns, packed (extra: mlx-lm)",
        ),
    ]
