"""Remembered templates-only answers.

A templates-only answer (no student prompt) depends only on the slice, the bank version and the class
subset, so it is kept (LRU of `entries`; label maps are ~50 KB each): a trainer's warm-up asks for the
same unlabeled slices once per epoch, and every repeat is answered without the decoder. A new bank
version is a new key, so an edited bank never answers from old templates.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from assistant_server.assistant.types import SliceOutput, copy_output


class AnswerCache:
    def __init__(self, entries: int = 1024):
        self.entries = entries
        self._items: OrderedDict[tuple, SliceOutput] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.entries > 0

    def get(self, key: tuple) -> SliceOutput | None:
        """(slice hash, bank version, class ids) → a copy of the remembered answer, or None."""
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return copy_output(hit)

    def put(self, key: tuple, out: SliceOutput) -> None:
        with self._lock:
            self._items[key] = copy_output(out)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
