"""Small torch adapters between a user's model and mahir's contract.

A user's model may return a tensor, a tuple or a dict (or a transformers ModelOutput) and takes
its inputs by keyword; mahir's torch artifacts always return a tuple in the spec's output order.
The ONNX exporter wants positional inputs, which `PositionalInputs` provides.
"""

from __future__ import annotations

import torch


class TupleOutputs(torch.nn.Module):
    """Call the wrapped model by keyword; return its answers as a tuple in spec order."""

    def __init__(self, model: torch.nn.Module, output_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.output_names = output_names

    def forward(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.model(**inputs)
        if torch.is_tensor(raw):
            return (raw,)
        if isinstance(raw, dict):
            return tuple(raw[name] for name in self.output_names)
        return tuple(raw)


class PositionalInputs(torch.nn.Module):
    """Take the inputs positionally in spec order and pass them on by keyword: torch.export
    handles dynamic shapes of positional arguments, not of **kwargs."""

    def __init__(self, model: torch.nn.Module, input_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result: tuple[torch.Tensor, ...] = self.model(
            **dict(zip(self.input_names, tensors, strict=False))
        )
        return result


class KeywordInputs(torch.nn.Module):
    """Take the inputs by keyword and pass them on positionally in spec order: the contract's
    calling convention for a program saved by torch.export, which takes them positionally."""

    def __init__(self, program: torch.nn.Module, input_names: tuple[str, ...]) -> None:
        super().__init__()
        self.program = program
        self.input_names = input_names

    def forward(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.program(*(inputs[name] for name in self.input_names)))


class LowPrecision(torch.nn.Module):
    """Run a copy of the model in a lower float precision while its contract stays fp32:
    floating inputs are cast down on the way in and outputs back to float32 on the way out."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model.to(dtype)
        self.dtype = dtype

    def forward(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cast = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        outputs: tuple[torch.Tensor, ...] = self.model(**cast)
        return tuple(o.float() if o.is_floating_point() else o for o in outputs)


class PooledEmbedding(torch.nn.Module):
    """A sentence encoder that answers with its sentence embedding: the token vectors pooled
    (and normalized) where they were computed, in float32, as `mahir.pooling.pool` pools them
    in numpy. On a GPU only (batch, hidden) floats then cross to the host instead of (batch,
    seq, hidden): 100 MB less per 256x128 batch of BERT-base."""

    def __init__(self, model: torch.nn.Module, mode: str, normalize: bool) -> None:
        super().__init__()
        self.model, self.mode, self.normalize = model, mode, normalize

    def forward(self, **inputs: torch.Tensor) -> tuple[torch.Tensor]:
        tokens = self.model(**inputs)[0].float()
        mask = inputs["attention_mask"] != 0
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        if self.mode == "mean":
            total = torch.where(mask.unsqueeze(-1), tokens, 0).sum(dim=1)
            pooled = total / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
        elif self.mode == "cls":  # the first real token, past any left padding
            pooled = tokens[rows, mask.int().argmax(dim=1)]
        elif self.mode == "max":
            pooled = torch.where(mask.unsqueeze(-1), tokens, -torch.inf).amax(dim=1)
        else:  # lasttoken: the last real token; a row with none gives zeros
            last = tokens.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)
            pooled = torch.where(mask.any(dim=1, keepdim=True), tokens[rows, last], 0)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=1, eps=1e-12)
        return (pooled,)
