"""Starts Infinity's CLI (`infinity_emb v2 ...`) under transformers 5, which it predates.

Infinity 0.0.78 counts tokens with `tokenizer.batch_encode_plus`, which transformers 5 removed:
its model warm-up calls it unconditionally, so the server fails at startup ("BertTokenizer has
no attribute batch_encode_plus"). Here, and only where the method is missing, it is put back as
the plain call it stood for (`tokenizer(texts, **kwargs)`, the same encodings). Infinity uses it
to log token counts and, with `--lengths-via-tokenize` (off by default), to order a queue by
length; embeddings go through sentence-transformers' own tokenize and forward, untouched.
Scoped to this process, which runs nothing but Infinity (benchmarks/gpu_serving.py starts it).

    python3 -m benchmarks.infinity_compat v2 --model-id FOLDER --engine torch ...
"""

from __future__ import annotations

from typing import Any


def restore_batch_encode_plus() -> bool:
    """Give tokenizers `batch_encode_plus` back if this transformers lacks it; True if it did."""
    from transformers import PreTrainedTokenizerBase

    if hasattr(PreTrainedTokenizerBase, "batch_encode_plus"):
        return False

    def batch_encode_plus(self: Any, texts: list[str], **kwargs: Any) -> Any:
        return self(texts, **kwargs)

    setattr(PreTrainedTokenizerBase, "batch_encode_plus", batch_encode_plus)  # noqa: B010
    return True


if __name__ == "__main__":
    import sys

    if restore_batch_encode_plus():
        print(
            "infinity_compat: tokenizer.batch_encode_plus restored for transformers 5", flush=True
        )
    from infinity_emb.cli import cli

    sys.argv[0] = "infinity_emb"
    cli()
