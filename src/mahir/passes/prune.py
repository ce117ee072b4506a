"""Pruning: take out what a trained model barely uses, so that there is less to compute.

Only structure that is physically removed makes a dense runtime faster: output channels and
neurons of CNNs and MLPs (`StructuredPrune`, here), attention heads and FFN neurons of
BERT-style encoders (`TransformerPrune`, in prune_transformer.py). Zeroed weights
(`MagnitudePrune`) keep every shape, so PyTorch, ONNX Runtime and OpenVINO on the CPU run them
exactly as fast as before (DESIGN.md); that pass says so in its metadata and the benchmark
measures it.

Every pass here prunes a deep copy of the artifact's module and never touches its input; the
copy keeps the model's contract (the spec's inputs, and outputs of the same shapes), which is
checked before it is returned, so fidelity is measured against the original like any other
candidate. Nothing is fine-tuned afterwards: what pruning costs in fidelity is documented on
each config. Torch-Pruning's dependency graph does the cutting (a removed channel disappears
from every layer that reads it); ranking is Torch-Pruning's for CNNs and MLPs, and ours for
transformers, where it ranks by the variance a head or neuron adds to the residual stream on
calibration data and folds the removed part's mean into the next bias (FLAP, An et al. 2024),
which keeps far more fidelity than weight magnitude or Taylor scores without fine-tuning.

A pass; imports the layers below it and knows nothing of search or serving.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import numpy as np
import torch

from mahir.errors import MahirError, Unsupported, first_line
from mahir.types import Artifact, ArtifactFormat

if TYPE_CHECKING:
    from mahir.passes import PassContext

Importance = Literal["taylor", "magnitude"]


@dataclass(frozen=True, slots=True)
class StructuredPrune:
    """Remove a share of the output channels (Conv) and neurons (Linear) of every layer of a CNN
    or MLP, ranked by Torch-Pruning on calibration data; the layers whose outputs the model
    returns keep all theirs. Layers that feed each other shrink on both sides, so the
    parameter count falls faster than `ratio` (about 1 - (1 - ratio)^2 for inner layers).
    Not fine-tuned. Measured at 0.3 (Taylor, round_to=None) on the test models (random
    weights): MLP 6,922 -> 3,882 parameters, logits cosine mean 0.90; CNN 5,514 -> 2,804,
    cosine 0.996. A trained model needs a short fine-tune to get its accuracy back."""

    ratio: float = 0.3
    """Share of each layer's output channels to remove, in (0, 0.9]; 0.1-0.5 without
    fine-tuning."""
    importance: Importance = "taylor"
    """How channels are ranked: "taylor" (|weight x gradient| of a proxy loss, the mean squared
    output, on `ctx.calibration`) or "magnitude" (L2 norm of the weights; needs no data)."""
    round_to: int | None = 8
    """Keep a multiple of this many channels per layer (vector units like multiples of 8);
    None keeps exactly what `ratio` says. Small layers may lose more than `ratio` for it."""
    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("torch",)

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 0.9:
            raise ValueError(f"ratio must be in (0, 0.9], got {self.ratio}")
        if self.importance not in get_args(Importance):
            raise ValueError(
                f"importance must be one of {get_args(Importance)}, got {self.importance!r}"
            )
        if self.round_to is not None and self.round_to < 1:
            raise ValueError(f"round_to must be >= 1 or None, got {self.round_to}")


@dataclass(frozen=True, slots=True)
class MagnitudePrune:
    """Zero the smallest-magnitude share of the weights of every Linear and Conv layer. Shapes
    and the parameter count stay: dense runtimes run it no faster (all-MiniLM-L6-v2 at 0.5 on
    ONNX Runtime: 46.5 ms per batch of 8 against 46.0), and it costs fidelity all the same
    (sentence-embedding cosine mean 0.72 there). Only a sparse kernel, or 2:4 on a GPU that
    has it, turns the zeros into speed; a compressed file is the other gain."""

    sparsity: float = 0.5
    """Share of each layer's weights set to zero, in (0, 1)."""
    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("torch",)

    def __post_init__(self) -> None:
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity}")


SPARSE_NOTE = (
    "unstructured sparsity: zeros in dense weight matrices; shapes and parameter count are "
    "unchanged, so dense runtimes (PyTorch, ONNX Runtime, OpenVINO on the CPU) run it no faster"
)


# --- StructuredPrune: Torch-Pruning on CNNs and MLPs ----------------------------------------


def structured_prune(artifact: Artifact, config: StructuredPrune, ctx: PassContext) -> Artifact:
    import torch_pruning as tp

    module = torch_copy(artifact, "StructuredPrune")
    if _has_attention(module):
        raise Unsupported(
            "StructuredPrune cuts channels of CNNs and MLPs; this model has attention: use "
            "TransformerPrune"
        )
    if config.importance == "taylor" and not ctx.calibration:
        raise Unsupported("Taylor importance needs calibration inputs; give sample data")
    example = as_tensors(ctx.model.example_inputs)
    shapes = output_shapes(module, example)
    before, widths = count_parameters(module), _widths(module)
    importance = (
        tp.importance.TaylorImportance()
        if config.importance == "taylor"
        else tp.importance.MagnitudeImportance(p=2)
    )
    try:
        pruner = tp.pruner.MetaPruner(
            module,
            example,
            importance=importance,
            pruning_ratio=config.ratio,
            ignored_layers=_output_layers(module, example),
            round_to=config.round_to,
            output_transform=proxy_loss,
        )
        if config.importance == "taylor":
            with _gradients(module):
                for batch in ctx.calibration:
                    proxy_loss(module(**as_tensors(batch))).backward()  # type: ignore[no-untyped-call]
                pruner.step()
        else:
            pruner.step()
    except MahirError:
        raise
    except Exception as err:  # Torch-Pruning raises many types; all mean "cannot prune this"
        raise Unsupported(f"Torch-Pruning cannot prune this model: {first_line(err)}") from err
    check_shapes(module, example, shapes)
    return artifact.derive(
        module=module.eval(),
        pruned="structured",
        ratio=config.ratio,
        importance=config.importance,
        params_before=before,
        params_after=count_parameters(module),
        layers=_cuts(widths, _widths(module)),
    )


def _output_layers(module: torch.nn.Module, example: dict[str, torch.Tensor]) -> list[Any]:
    """Layers whose output width is part of the model's contract: those whose output the model
    returns (a view of it, too), and the last one to run (the classifier of a plain CNN/MLP,
    even when a softmax follows it)."""

    ran: list[tuple[torch.nn.Module, Any]] = []

    def record(layer: torch.nn.Module, _args: Any, out: Any) -> None:
        ran.append((layer, out))

    hooks = [m.register_forward_hook(record) for m in module.modules() if is_prunable(m)]
    try:
        with torch.no_grad():
            outputs = module(**example)
    finally:
        for hook in hooks:
            hook.remove()
    returned = {o.untyped_storage().data_ptr() for o in outputs if torch.is_tensor(o)}
    layers = [
        layer
        for layer, out in ran
        if torch.is_tensor(out) and out.untyped_storage().data_ptr() in returned
    ]
    if ran:
        layers.append(ran[-1][0])
    return list(dict.fromkeys(layers))


# --- MagnitudePrune: zeros, no speed ---------------------------------------------------------


def magnitude_prune(artifact: Artifact, config: MagnitudePrune, ctx: PassContext) -> Artifact:
    from torch.nn.utils import prune

    module = torch_copy(artifact, "MagnitudePrune")
    layers = [(n, m) for n, m in module.named_modules() if is_prunable(m)]
    if not layers:
        raise Unsupported("MagnitudePrune zeroes Linear and Conv weights; this model has none")
    zeroed = total = 0
    with torch.no_grad():
        for _, layer in layers:
            prune.l1_unstructured(layer, "weight", amount=config.sparsity)  # type: ignore[no-untyped-call]
            prune.remove(layer, "weight")  # type: ignore[no-untyped-call]
            zeroed += int((layer.weight == 0).sum())
            total += layer.weight.numel()
    return artifact.derive(
        module=module.eval(),
        pruned="magnitude",
        sparsity=config.sparsity,
        params_before=count_parameters(module),
        params_after=count_parameters(module),
        zeroed_weights=zeroed,
        layer_weights=total,
        note=SPARSE_NOTE,
    )


# --- shared ----------------------------------------------------------------------------------


def torch_copy(artifact: Artifact, what: str) -> Any:
    """A deep copy of the artifact's module in eval mode: the input is never touched."""
    if artifact.format != "torch" or not isinstance(artifact.module, torch.nn.Module):
        raise Unsupported(
            f"{what} changes a live torch module; this artifact is {artifact.format}: put the "
            "step before any export"
        )
    return copy.deepcopy(artifact.module).eval()


def is_prunable(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))


def _has_attention(module: torch.nn.Module) -> bool:
    return any(
        isinstance(m, torch.nn.MultiheadAttention) or hasattr(m, "num_attention_heads")
        for m in module.modules()
    )


def as_tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in batch.items()}


def proxy_loss(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """A loss with no labels: the mean squared output. Its gradient says how much each weight
    moves the outputs, which is what removing it would do."""
    floats = [o.float().pow(2).mean() for o in outputs if o.is_floating_point()]
    if not floats:
        raise Unsupported("the model has no floating-point output to rank channels by")
    loss: torch.Tensor = sum(floats[1:], floats[0])
    return loss


@contextlib.contextmanager
def _gradients(module: torch.nn.Module) -> Iterator[None]:
    """Gradients on for a Taylor ranking, then dropped; frozen parameters stay frozen."""
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    for p in module.parameters():
        p.requires_grad_(True)
    module.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for name, p in module.named_parameters():
            p.grad = None
            p.requires_grad_(name not in frozen)


def output_shapes(module: torch.nn.Module, example: dict[str, torch.Tensor]) -> list[Any]:
    with torch.no_grad():
        return [tuple(o.shape) for o in module(**example)]


def check_shapes(
    module: torch.nn.Module, example: dict[str, torch.Tensor], expected: list[Any]
) -> None:
    got = output_shapes(module, example)
    if got != expected:
        raise Unsupported(
            f"pruning changed the output shapes from {expected} to {got}: a layer whose output "
            "the model returns was cut; this model's structure is not supported"
        )


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _widths(module: torch.nn.Module) -> dict[str, int]:
    """Output width of each Linear/Conv, by name inside the user's model."""
    return {
        name.removeprefix("model."): int(getattr(m, "out_features", getattr(m, "out_channels", 0)))
        for name, m in module.named_modules()
        if is_prunable(m)
    }


def _cuts(before: dict[str, int], after: dict[str, int]) -> dict[str, list[int]]:
    return {name: [n, after[name]] for name, n in before.items() if after[name] != n}
