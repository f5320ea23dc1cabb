"""Prompt tokenization for :class:`spar_runtime.SparPipeline` (text prompts only; token ids need none).

- :func:`load_tokenizer`: a checkpoint's ``tokenizer.json`` through the ``tokenizers`` library
  (the fast-tokenizer file that InternVL/Qwen2 checkpoints ship), wrapped in :class:`HFTokenizer`.
- :class:`ByteTokenizer`: a stand-in for random-weight pipelines (``SparPipeline.random``,
  ``spar generate --random-weights``): ids 0..255 are UTF-8 bytes, 256..259 the chat markers.

Both build the InternVL/Qwen2 chat layout::

    <|im_start|>user\\n[<img><IMG_CONTEXT> x T</img>\\n]{text}<|im_end|>\\n<|im_start|>assistant\\n[<img>]

with the trailing ``<img>`` (image-start tag) for generation prompts, as SPAR's reference does.
"""

from __future__ import annotations

import os

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer"]


class _ChatMixin:
    def chat_ids(self, text: str, *, image_tokens: int = 0, image_token_id: int | None = None,
                 generation: bool = False) -> list[int]:
        """Token ids of one user turn (optionally with T image placeholders first) and the
        assistant prefix; ``generation`` appends the image-start tag."""
        ids = [self.im_start] + self.encode("user\n")
        if image_tokens:
            if image_token_id is None:
                raise ValueError("image_token_id: required when image_tokens > 0")
            ids += [self.img_start] + [int(image_token_id)] * int(image_tokens) + [self.img_end] + self.encode("\n")
        ids += self.encode(text) + [self.im_end] + self.encode("\n") + [self.im_start] + self.encode("assistant\n")
        if generation:
            ids.append(self.img_start)
        return ids


class ByteTokenizer(_ChatMixin):
    """UTF-8 bytes as ids 0..255; 256 ``<|im_start|>``, 257 ``<|im_end|>`` (end of sequence),
    258 ``<img>``, 259 ``</img>``. Meaningless for trained weights: only for random-weight demos."""

    im_start, im_end, img_start, img_end = 256, 257, 258, 259
    SPECIALS = 260

    def __init__(self, vocab_size: int):
        if vocab_size < self.SPECIALS:
            raise ValueError(f"vocab_size: ByteTokenizer needs at least {self.SPECIALS} ids, got {vocab_size}")
        self.vocab_size = vocab_size
        self.eos_token_id = self.im_end

    @classmethod
    def fits(cls, config) -> bool:
        v = int(config.text_config["vocab_size"])
        img = config.mllm_config.get("image_token_id")
        return v >= cls.SPECIALS and (img is None or int(img) >= cls.SPECIALS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer(_ChatMixin):
    """A ``tokenizer.json`` (``tokenizers.Tokenizer``) with the Qwen2/InternVL chat tokens."""

    def __init__(self, tok):
        self.tok = tok

        def special(s):
            i = tok.token_to_id(s)
            if i is None:
                raise ValueError(f"tokenizer: special token {s!r} not in the vocabulary")
            return i

        self.im_start, self.im_end = special("<|im_start|>"), special("<|im_end|>")
        self.img_start, self.img_end = special("<img>"), special("</img>")
        self.eos_token_id = self.im_end

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(folder: str):
    """The tokenizer of a component folder, or None when it has no ``tokenizer.json`` (or lacks the
    chat tokens)."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer

    try:
        return HFTokenizer(Tokenizer.from_file(path))
    except ValueError:
        return None
