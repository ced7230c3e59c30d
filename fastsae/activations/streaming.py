"""Activations streamed into training without touching disk: a shuffling buffer over harvested batches."""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor

from .models import Capture, _check_positive, _prepare
from .text import TextSource, describe_text_source, iter_batches, tokenizer_template

# ---------------------------------------------------------------------------------------------
# Streaming into training, without touching disk
# ---------------------------------------------------------------------------------------------
class ActivationStream:
    """Shuffled ``[batch_size, d_in]`` float32 batches of activations, harvested on the fly.

    Activations fill a buffer of ``buffer_tokens`` rows; once full, it is shuffled and the first half is
    served while the second half stays to mix with the next fill (the usual SAE shuffling buffer: tokens
    of one context end up spread over many batches). ``repeat=True`` starts the text again when it ends
    (a new shuffle each pass); otherwise iteration ends after the last partial buffer. Iterating again
    restarts from the beginning of the text.
    """

    def __init__(self, model, hook: str, text: TextSource, *, tokenizer=None, batch_size: int = 4096,
                 buffer_tokens: int = 1 << 16, max_tokens: Optional[int] = None, context_length: int = 128,
                 harvest_batch_size: int = 32, pack: bool = True, drop_special: bool = False,
                 skip_tokens: int = 0, text_field: str = "text", repeat: bool = False, seed: int = 0,
                 device=None, progress: bool = False):
        self.batch_size = _check_positive("batch_size", batch_size)
        self.buffer_tokens = _check_positive("buffer_tokens", buffer_tokens)
        if buffer_tokens < 2 * batch_size:
            raise ValueError(f"buffer_tokens must be at least 2 * batch_size = {2 * batch_size}, got {buffer_tokens}")
        self.max_tokens = _check_positive("max_tokens", max_tokens, allow_none=True)
        self.model, self.tokenizer = _prepare(model, tokenizer, device)
        self.capture = Capture(self.model, hook, stop_early=True)
        self.template = tokenizer_template(self.tokenizer)
        self.hook, self.text = hook, text
        self.kw = dict(context_length=_check_positive("context_length", context_length),
                       batch_size=_check_positive("harvest_batch_size", harvest_batch_size), pack=pack,
                       drop_special=drop_special, skip_tokens=skip_tokens, text_field=text_field)
        self.repeat, self.seed, self.progress = repeat, seed, progress
        self.d_in = self._probe_d_in()

    def _probe_d_in(self) -> int:
        for batch in iter_batches(self.tokenizer, self.text, template=self.template,
                                  **dict(self.kw, batch_size=1)):
            return int(self.capture(batch).shape[-1])
        raise ValueError(f"text: the text source {describe_text_source(self.text)} yielded no tokens")

    def _activations(self) -> Iterator[Tensor]:
        served = 0
        while True:
            any_batch = False
            for batch in iter_batches(self.tokenizer, self.text, template=self.template, **self.kw):
                any_batch = True
                x = self.capture.data(batch).float().cpu()
                if self.max_tokens is not None:
                    x = x[: self.max_tokens - served]
                served += x.shape[0]
                if x.shape[0]:
                    yield x
                if self.max_tokens is not None and served >= self.max_tokens:
                    return
            if not self.repeat or not any_batch:
                return

    def __iter__(self) -> Iterator[Tensor]:
        from tqdm.auto import tqdm

        g = torch.Generator().manual_seed(self.seed)
        buf = torch.empty(0, self.d_in)
        bar = tqdm(total=self.max_tokens, unit="tok", unit_scale=True, disable=not self.progress,
                   desc=f"stream {self.hook}")
        try:
            for x in self._activations():
                bar.update(x.shape[0])
                buf = torch.cat([buf, x])
                if buf.shape[0] >= self.buffer_tokens:
                    buf = buf[torch.randperm(buf.shape[0], generator=g)]
                    n_serve = (buf.shape[0] // 2) // self.batch_size * self.batch_size
                    for i in range(0, n_serve, self.batch_size):
                        yield buf[i:i + self.batch_size]
                    buf = buf[n_serve:]
            buf = buf[torch.randperm(buf.shape[0], generator=g)]
            for i in range(0, buf.shape[0], self.batch_size):
                yield buf[i:i + self.batch_size]
        finally:
            bar.close()


def stream(model, hook: str, text: TextSource, **kwargs) -> ActivationStream:
    """``ActivationStream(model, hook, text, **kwargs)``: shuffled activation batches, no disk."""
    return ActivationStream(model, hook, text, **kwargs)
