"""Everything that differs by kind of model, one module per family.

A family knows how to make inputs for its models (a workload shaped like traffic, verification
shapes unlike the traced ones, held-out inputs no pass tuned on, the user's data file), which
fidelity measure matters (a sentence encoder's pooled vector, a classifier's top-1, a tensor's
cosine), what a user metric scores, what is recorded in an output directory so that a server can
rebuild the family, and what a report says about the model. `Model.family` holds one; callers ask
it and never ask what kind of model they hold. Serving turns requests into tensors through the
codec for the family (`mahir.serve`), the only other place that knows the kinds apart.

Families now: `text` (tokenized text: sentence embeddings, token outputs, sequence classifiers),
`vision` (image classifiers with their image processor), `tensor` (any other model). Decoder LLMs
(`decoder.py`) have another contract: generation with a KV cache, not one forward.

Imports types, errors, pooling, workload and the frameworks; never model, runtimes or above.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mahir.errors import BadInput
from mahir.types import InputSpec, Outputs, Quality
from mahir.workload import Batch, Workload


class Family(Protocol):
    """What differs by kind of model; one instance per loaded model, holding its spec."""

    @property
    def kind(self) -> str:
        """`text`, `vision` or `tensor`: what mahir.json and reports call the family."""
        ...

    @property
    def spec(self) -> InputSpec: ...

    @property
    def transformer(self) -> bool:
        """Whether transformer-only techniques (attention-head pruning, NNCF's transformer
        scheme) apply."""
        ...

    @property
    def pools(self) -> bool:
        """Whether the answer is a vector pooled over token outputs (a sentence encoder), which
        the model itself can compute (`passes/pooling.py`)."""
        ...

    @property
    def fidelity_name(self) -> str:
        """What the headline fidelity measures, for table captions ("embedding", "output")."""
        ...

    def workload(
        self,
        sizes: Sequence[int],
        *,
        batches_per_size: int = 8,
        seed: int = 0,
        texts: Sequence[str] | None = None,
        token_range: tuple[int, int] | None = None,
    ) -> Workload:
        """Batches shaped like traffic for each batch size (text from `texts` if given)."""
        ...

    def verification_batches(self) -> list[Batch]:
        """A few shapes unlike the traced example, for checking an export or a conversion."""
        ...

    def held_out_batches(
        self, user_held: Sequence[str] = (), *, batch_size: int = 16, seed: int = 3
    ) -> list[Batch]:
        """Inputs no pass tuned on, varied enough that the worst case is not luck."""
        ...

    def compare(
        self,
        outputs: Sequence[Outputs],
        reference: Sequence[Outputs],
        batches: Sequence[Batch],
        logits: frozenset[str],
    ) -> Quality:
        """The family's fidelity of `outputs` to `reference` on `batches`."""
        ...

    def scored(self, outputs: Outputs, batch: Batch) -> Outputs:
        """What a user metric scores for one batch: the outputs, plus what users of this kind
        of model really receive (a sentence encoder's pooled vector)."""
        ...

    def token_lengths(self, batch: Batch) -> np.ndarray | None:
        """Each item's tokens that are not padding; None for models that read no tokens."""
        ...

    def read_user_data(self, path: Path, batch_size: int) -> tuple[Any, list[Batch]]:
        """What a user metric receives (the data as read) and the inputs made from it."""
        ...

    def summary(self) -> dict[str, Any]:
        """What a report says about the model beyond its spec."""
        ...

    def save(self, folder: Path) -> dict[str, Any]:
        """Write what a server needs to rebuild the family into `folder` (a tokenizer, an image
        processor); return the entries for mahir.json."""
        ...


def refuse_text_options(family: Family, name: str, given: dict[str, bool]) -> None:
    """Refuse options that shape text (`given`: flag -> whether it was given) for a model that
    does not read text, instead of ignoring them."""
    flags = " and ".join(flag for flag, on in given.items() if on)
    if flags and family.kind != "text":
        raise BadInput(
            f"{flags} shape text, and {name} takes tensors "
            f"({', '.join(family.spec.input_names)}): leave {flags} out"
        )


def open_family(
    kind: str | None, spec: InputSpec, folder: Path, manifest: dict[str, Any]
) -> Family:
    """The family an output directory recorded (`save`), rebuilt for serving. Directories
    written before mahir recorded the family are text when they hold a tokenizer."""
    from mahir.families.tensor import Tensor
    from mahir.families.text import TOKENIZER, Text
    from mahir.families.vision import Vision

    if kind is None:
        kind = "text" if (folder / TOKENIZER).is_dir() else "tensor"
    openers: dict[str, Any] = {"text": Text.open, "vision": Vision.open, "tensor": Tensor.open}
    if kind not in openers:
        raise BadInput(
            f"mahir.json names the model family {kind!r}, unknown to this mahir: upgrade mahir"
        )
    family: Family = openers[kind](spec, folder, manifest)
    return family


def real_tokens(family: Family, batches: Sequence[Batch]) -> list[int] | None:
    """Each batch's tokens that are not padding, for tokens/s; None where the family counts none."""
    counted = [family.token_lengths(batch) for batch in batches]
    if any(c is None for c in counted):
        return None
    return [int(c.sum()) for c in counted if c is not None]


def open_tokenizer(folder: Path) -> Any:
    """The saved tokenizer, as `AutoTokenizer` would open it: the class its
    tokenizer_config.json names, imported alone. `AutoTokenizer` imports transformers' model
    registry and with it torch (2.2 s against 1.0 s here), which a server of an ONNX or
    OpenVINO directory never needs."""
    import transformers

    config = folder / "tokenizer_config.json"
    name = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    # A class name transformers does not export (a remote-code tokenizer) goes the long way.
    tokenizer_class = getattr(transformers, name, None) if isinstance(name, str) else None
    if tokenizer_class is None:
        tokenizer_class = transformers.AutoTokenizer
    return tokenizer_class.from_pretrained(str(folder))
