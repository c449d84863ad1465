"""The chat dataset's prompts, for on-policy methods: which records have one, and batches of
them drawn epoch by epoch.

A record's prompt is the tokens of everything before its first assistant turn's content, as
the template renders it with ``add_generation_prompt=True``
(:meth:`kdcore.data.chat.ChatDataset.prompt`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kdcore.errors import SpecError


class Prompts:
    """Batches of prompts: ``prompted`` says which records have one (in file order),
    ``prompt(record)`` gives its tokens or None when the template refuses it. The val split
    is the last ``val_fraction`` of the records, as for the rows."""

    def __init__(
        self,
        prompted: np.ndarray,
        prompt: Callable[[int], list[int] | None],
        *,
        val_fraction: float,
        seed: int,
    ):
        self._has, self._prompt = prompted, prompt
        self.val_fraction, self.seed = val_fraction, seed
        self._ids: dict[str, np.ndarray] = {}
        self._order: tuple | None = None

    def records(self, split: str) -> np.ndarray:
        """The records of ``split`` that have a prompt, in file order."""
        if split not in self._ids:
            n = len(self._has)
            cut = int(n * (1 - self.val_fraction))
            span = np.arange(cut) if split == "train" else np.arange(cut, n)
            self._ids[split] = span[self._has[span]]
        return self._ids[split]

    def _epoch(self, split: str, epoch: int, n: int) -> np.ndarray:
        if split != "train":
            return np.arange(n)
        if self._order is None or self._order[0] != epoch:
            # The trailing 1 keeps this order apart from the rows' epoch order (seed, epoch).
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(n)
            self._order = (epoch, order)
        return self._order[1]

    def batch(
        self, index: int, batch_size: int, split: str, max_tokens: int | None
    ) -> list[list[int]]:
        """See :meth:`kdcore.data.chat.ChatDataset.prompts`."""
        records = self.records(split)
        n = len(records)
        if n == 0:
            raise SpecError(f"the {split} split has no records with a prompt")
        out = []
        for sample in range(index * batch_size, (index + 1) * batch_size):
            epoch, k = divmod(sample, n)
            order = self._epoch(split, epoch, n)
            tokens = None
            for step in range(n):
                tokens = self._prompt(int(records[order[(k + step) % n]]))
                if tokens is not None:
                    break
            if tokens is None:
                raise SpecError(f"the chat template refuses every prompt of the {split} split")
            out.append(tokens[-max_tokens:] if max_tokens else tokens)
        return out
