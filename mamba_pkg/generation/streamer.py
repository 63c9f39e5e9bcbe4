"""Streaming: print text while ``generate`` produces it.

``generate`` calls ``streamer.put(ids)`` once with the prompt, shape (1, T),
then once per new token with shape (1,), and ``streamer.end()`` at the end (the
protocol of transformers' streamers, so theirs work here too and ours work there).
"""

from __future__ import annotations

import sys
from typing import Optional, TextIO

import torch


class BaseStreamer:
    """Receives token ids as they are produced."""

    def put(self, value: torch.Tensor) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


class TextStreamer(BaseStreamer):
    """Decode tokens to text and write it to ``file`` as soon as it is complete.

    tokenizer: anything with ``decode(list_of_ids) -> str`` (a ``tokenizers.Tokenizer``
    or a transformers tokenizer). Text is held back while it ends in an unfinished
    UTF-8 sequence (a byte-level BPE token may carry half a character).
    skip_prompt: do not echo the prompt. Only batch size 1 can be streamed.
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, file: Optional[TextIO] = None):
        if not callable(getattr(tokenizer, "decode", None)):
            raise TypeError("tokenizer: expected an object with a decode(ids) method")
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.file = file
        self.text = ""  # everything written so far (excluding a skipped prompt)
        self._ids: list = []
        self._printed = 0
        self._next_is_prompt = True

    def put(self, value: torch.Tensor) -> None:
        value = torch.as_tensor(value)
        if value.dim() == 2:
            if value.shape[0] != 1:
                raise ValueError(f"TextStreamer streams batch size 1 only, got ids of shape {tuple(value.shape)}")
            value = value[0]
        ids = value.reshape(-1).tolist()
        if self._next_is_prompt:
            self._next_is_prompt = False
            if self.skip_prompt:
                return
        self._ids.extend(ids)
        text = self._decode()
        if text.endswith("\ufffd"):
            return
        self._emit(text[self._printed:])
        self._printed = len(text)
        # Start afresh after a line break so decoding stays cheap on long outputs.
        if text.endswith("\n"):
            self._ids, self._printed = [], 0

    def end(self) -> None:
        text = self._decode()
        self._emit(text[self._printed:])
        self._ids, self._printed = [], 0
        self._next_is_prompt = True
        self._write("\n")

    def _decode(self) -> str:
        return self.tokenizer.decode(self._ids) if self._ids else ""

    def _emit(self, text: str) -> None:
        if text:
            self.text += text
            self._write(text)

    def _write(self, text: str) -> None:
        out = self.file if self.file is not None else sys.stdout
        out.write(text)
        out.flush()
