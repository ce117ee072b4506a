"""Pruning: take out what a trained model barely uses, so that there is less to compute.

Only structure that is physically removed makes a dense runtime faster: output channels and
neurons of CNNs and MLPs (`StructuredPrune`), attention heads and FFN neurons of BERT-style
encoders (`TransformerPrune`). Zeroed weights (`MagnitudePrune`) keep every shape, so PyTorch,
ONNX Runtime and OpenVINO on the CPU run them exactly as fast as before (DESIGN.md); that pass
says so in its metadata and the benchmark measures it.

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
class TransformerPrune:
    """Remove attention heads and FFN (intermediate) neurons from every layer of a BERT-style
    encoder, the same number in each layer; the hidden size, and so every output's shape, stays.
    Heads and neurons are ranked by the variance they add to the layer's output on
    `ctx.calibration` (padding excluded), and the mean of what is removed moves into the bias.

    Not fine-tuned, so fidelity drops. Measured on all-MiniLM-L6-v2 (22.7M parameters, 11.7M
    of them word embeddings, which stay), sentence-embedding cosine to the original on generated
    text, over calibration sets of 16-64 sentences (tests/test_prune.py asserts floors below):
      0.1/0.1: 11 of 12 heads, 1384 of 1536 neurons; 21.7M parameters; mean 0.97, worst 0.91-0.94
      0.3/0.3:  8 of 12 heads, 1072 of 1536 neurons; 19.4M parameters; mean 0.86-0.88,
               worst 0.75-0.81; about 1.4x faster (batch 8, AMD EPYC, 2 threads: ONNX Runtime
               46 -> 33 ms, OpenVINO 42 -> 30 ms, PyTorch 51 -> 37 ms)
    For comparison, Torch-Pruning's magnitude or Taylor ranking of the FFN alone at 0.3 keeps
    cosine mean 0.81; this ranking 0.94. Use it where a search can weigh the loss, or distill."""

    head_ratio: float = 0.3
    """Share of attention heads to remove per layer, in [0, 0.9] (rounded to whole heads; at
    least one head stays)."""
    ffn_ratio: float = 0.3
    """Share of FFN neurons to remove per layer, in [0, 0.9] (the rest rounded to a multiple
    of 8)."""
    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("torch",)

    def __post_init__(self) -> None:
        for name, value in (("head_ratio", self.head_ratio), ("ffn_ratio", self.ffn_ratio)):
            if not 0.0 <= value <= 0.9:
                raise ValueError(f"{name} must be in [0, 0.9], got {value}")
        if self.head_ratio == 0.0 and self.ffn_ratio == 0.0:
            raise ValueError("head_ratio and ffn_ratio are both 0: nothing would be pruned")


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

    module = _torch_copy(artifact, "StructuredPrune")
    if _has_attention(module):
        raise Unsupported(
            "StructuredPrune cuts channels of CNNs and MLPs; this model has attention: use "
            "TransformerPrune"
        )
    if config.importance == "taylor" and not ctx.calibration:
        raise Unsupported("Taylor importance needs calibration inputs; give sample data")
    example = _tensors(ctx.model.example_inputs)
    shapes = _output_shapes(module, example)
    before, widths = _count(module), _widths(module)
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
            output_transform=_proxy_loss,
        )
        if config.importance == "taylor":
            with _gradients(module):
                for batch in ctx.calibration:
                    _proxy_loss(module(**_tensors(batch))).backward()  # type: ignore[no-untyped-call]
                pruner.step()
        else:
            pruner.step()
    except MahirError:
        raise
    except Exception as err:  # Torch-Pruning raises many types; all mean "cannot prune this"
        raise Unsupported(f"Torch-Pruning cannot prune this model: {first_line(err)}") from err
    _check_shapes(module, example, shapes)
    return artifact.derive(
        module=module.eval(),
        pruned="structured",
        ratio=config.ratio,
        importance=config.importance,
        params_before=before,
        params_after=_count(module),
        layers=_cuts(widths, _widths(module)),
    )


def _output_layers(module: torch.nn.Module, example: dict[str, torch.Tensor]) -> list[Any]:
    """Layers whose output width is part of the model's contract: those whose output the model
    returns (a view of it, too), and the last one to run (the classifier of a plain CNN/MLP,
    even when a softmax follows it)."""

    ran: list[tuple[torch.nn.Module, Any]] = []

    def record(layer: torch.nn.Module, _args: Any, out: Any) -> None:
        ran.append((layer, out))

    hooks = [m.register_forward_hook(record) for m in module.modules() if _is_prunable(m)]
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


# --- TransformerPrune: heads and FFN neurons of BERT-style encoders --------------------------


def transformer_prune(artifact: Artifact, config: TransformerPrune, ctx: PassContext) -> Artifact:
    import torch_pruning as tp

    module = _torch_copy(artifact, "TransformerPrune")
    layers = _encoder_layers(module)
    if not layers:
        inner = getattr(module, "model", module)
        raise Unsupported(
            f"TransformerPrune handles BERT-style encoders (attention.self.query/key/value, "
            f"intermediate.dense, output.dense in each layer); {type(inner).__name__} has none"
        )
    if not ctx.calibration:
        raise Unsupported("TransformerPrune ranks heads and neurons on calibration inputs")
    example = _tensors(ctx.model.example_inputs)
    shapes = _output_shapes(module, example)
    before = _count(module)
    stats = _layer_statistics(module, layers, ctx.calibration)
    try:
        graph = tp.DependencyGraph().build_dependency(
            module, example_inputs=example, output_transform=_proxy_loss
        )
    except MahirError:
        raise
    except Exception as err:  # Torch-Pruning raises many types; all mean "cannot trace this"
        raise Unsupported(f"Torch-Pruning cannot trace this model: {first_line(err)}") from err
    with torch.no_grad():
        cuts = {name: _prune_layer(graph, name, layer, stats, config) for name, layer in layers}
        _update_config(layers[0][1])
    _check_shapes(module, example, shapes)
    return artifact.derive(
        module=module.eval(),
        pruned="heads+ffn",
        head_ratio=config.head_ratio,
        ffn_ratio=config.ffn_ratio,
        params_before=before,
        params_after=_count(module),
        layers=cuts,
    )


def _prune_layer(
    graph: Any,
    name: str,
    layer: Any,
    stats: dict[tuple[str, str], _Moments],
    config: TransformerPrune,
) -> dict[str, Any]:
    """Cut the least-used heads and FFN neurons of one encoder layer; what was cut, for meta."""
    attention = layer.attention.self
    heads, size = attention.num_attention_heads, attention.attention_head_size
    dense = layer.attention.output.dense
    n_heads = min(heads - 1, int(config.head_ratio * heads + 0.5))
    removed = _remove_units(graph, attention.query, dense, stats[name, "heads"], n_heads, size)
    attention.num_attention_heads = heads - len(removed)
    attention.all_head_size = attention.num_attention_heads * size
    neurons = layer.intermediate.dense.out_features
    kept = max(8, int(neurons * (1 - config.ffn_ratio) / 8 + 0.5) * 8)  # a multiple of 8
    kept = neurons if config.ffn_ratio == 0 else kept
    ffn = stats[name, "ffn"]
    _remove_units(graph, layer.intermediate.dense, layer.output.dense, ffn, neurons - kept, 1)
    _check_layer(name, layer, attention)
    return {
        "heads": [heads, attention.num_attention_heads],
        "heads_removed": removed,
        "ffn": [neurons, layer.intermediate.dense.out_features],
    }


def _update_config(layer: Any) -> None:
    """The shared config follows the (uniform) new widths. Heads keep their size, so
    hidden_size / num_attention_heads is no longer the head size: the live module, not the
    config, is the model now."""
    config = getattr(layer.attention.self, "config", None)
    if config is not None:
        config.num_attention_heads = layer.attention.self.num_attention_heads
        config.intermediate_size = layer.intermediate.dense.out_features


def _encoder_layers(module: torch.nn.Module) -> list[tuple[str, Any]]:
    """Layers laid out like BERT's (RoBERTa, ELECTRA, MiniLM...): self-attention with q/k/v
    projections and head counts, an output projection, and a two-Linear FFN."""

    def linear(obj: Any, path: str) -> bool:
        for part in path.split("."):
            obj = getattr(obj, part, None)
        return isinstance(obj, torch.nn.Linear)

    found = []
    for name, layer in module.named_modules():
        attention = getattr(getattr(layer, "attention", None), "self", None)
        if (
            all(linear(layer, p) for p in ("attention.output.dense", "intermediate.dense"))
            and linear(layer, "output.dense")
            and all(linear(attention, p) for p in ("query", "key", "value"))
            and isinstance(getattr(attention, "num_attention_heads", None), int)
            and isinstance(getattr(attention, "attention_head_size", None), int)
            and not hasattr(layer, "crossattention")
        ):
            found.append((name.removeprefix("model."), layer))
    return found


@dataclass
class _Moments:
    """Running first and within-unit second moments of a layer's input over real tokens."""

    unit: int
    count: int = 0
    total: Any = 0.0
    outer: Any = 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        blocks = x.view(x.shape[0], -1, self.unit)
        self.count += x.shape[0]
        self.total = self.total + x.sum(0)
        self.outer = self.outer + torch.einsum("nui,nuj->uij", blocks, blocks)


def _layer_statistics(
    module: torch.nn.Module, layers: Sequence[tuple[str, Any]], batches: Sequence[dict[str, Any]]
) -> dict[tuple[str, str], _Moments]:
    """Moments of each layer's head outputs (input of attention.output.dense, one unit per head)
    and FFN activations (input of output.dense), over the tokens the attention mask keeps."""

    stats: dict[tuple[str, str], _Moments] = {}
    keep: list[torch.Tensor] = []
    hooks = []
    for name, layer in layers:
        size = layer.attention.self.attention_head_size
        for kind, linear, unit in (
            ("heads", layer.attention.output.dense, size),
            ("ffn", layer.output.dense, 1),
        ):
            moments = stats[name, kind] = _Moments(unit)

            def hook(_: Any, args: tuple[Any, ...], moments: _Moments = moments) -> None:
                moments.add(args[0][keep[-1]])

            hooks.append(linear.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                tensors = _tensors(batch)
                first = next(iter(tensors.values()))
                mask = tensors.get("attention_mask", torch.ones(first.shape[:2]))
                keep.append(mask != 0)
                module(**tensors)
    finally:
        for h in hooks:
            h.remove()
    return stats


def _remove_units(
    graph: Any, root: Any, reader: Any, moments: _Moments, count: int, unit: int
) -> list[int]:
    """Remove the `count` units (heads of `unit` channels, or neurons) of `reader`'s input that
    add the least variance to its output, fold their mean output into `reader`'s bias, and let
    Torch-Pruning cut them from `root` and everything coupled to it. Returns the units cut."""
    import torch_pruning as tp

    if count <= 0:
        return []
    mean = moments.total / moments.count
    blocks = mean.view(-1, unit)
    covariance = moments.outer / moments.count - torch.einsum("ui,uj->uij", blocks, blocks)
    weight = reader.weight.double().view(reader.out_features, -1, unit)
    variance = torch.einsum("oui,uij,ouj->u", weight, covariance, weight)
    units = sorted(torch.argsort(variance)[:count].tolist())
    channels = [u * unit + i for u in units for i in range(unit)]
    if reader.bias is None:
        raise Unsupported(f"{type(reader).__name__} without bias: the removed mean has no home")
    reader.bias += (reader.weight.double()[:, channels] @ mean[channels]).to(reader.bias.dtype)
    graph.get_pruning_group(root, tp.prune_linear_out_channels, idxs=channels).prune()
    return units


def _check_layer(name: str, layer: Any, attention: Any) -> None:
    """Torch-Pruning must have cut q, k, v and both readers together, or the layer is broken."""
    width = attention.all_head_size
    projections = (attention.query, attention.key, attention.value)
    if {p.out_features for p in projections} != {width} or (
        layer.attention.output.dense.in_features != width
        or layer.output.dense.in_features != layer.intermediate.dense.out_features
    ):
        raise Unsupported(
            f"{name}: Torch-Pruning did not couple q/k/v and the output projection (attention "
            "implementation it cannot trace); load the model with attn_implementation='sdpa'"
        )


# --- MagnitudePrune: zeros, no speed ---------------------------------------------------------


def magnitude_prune(artifact: Artifact, config: MagnitudePrune, ctx: PassContext) -> Artifact:
    from torch.nn.utils import prune

    module = _torch_copy(artifact, "MagnitudePrune")
    layers = [(n, m) for n, m in module.named_modules() if _is_prunable(m)]
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
        params_before=_count(module),
        params_after=_count(module),
        zeroed_weights=zeroed,
        layer_weights=total,
        note=SPARSE_NOTE,
    )


# --- shared ----------------------------------------------------------------------------------


def _torch_copy(artifact: Artifact, what: str) -> Any:
    """A deep copy of the artifact's module in eval mode: the input is never touched."""
    if artifact.format != "torch" or not isinstance(artifact.module, torch.nn.Module):
        raise Unsupported(
            f"{what} prunes a live torch module; this artifact is {artifact.format}: put the "
            "step before any export"
        )
    return copy.deepcopy(artifact.module).eval()


def _is_prunable(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))


def _has_attention(module: torch.nn.Module) -> bool:
    return any(
        isinstance(m, torch.nn.MultiheadAttention) or hasattr(m, "num_attention_heads")
        for m in module.modules()
    )


def _tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in batch.items()}


def _proxy_loss(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
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


def _output_shapes(module: torch.nn.Module, example: dict[str, torch.Tensor]) -> list[Any]:
    with torch.no_grad():
        return [tuple(o.shape) for o in module(**example)]


def _check_shapes(
    module: torch.nn.Module, example: dict[str, torch.Tensor], expected: list[Any]
) -> None:
    got = _output_shapes(module, example)
    if got != expected:
        raise Unsupported(
            f"pruning changed the output shapes from {expected} to {got}: a layer whose output "
            "the model returns was cut; this model's structure is not supported"
        )


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _widths(module: torch.nn.Module) -> dict[str, int]:
    """Output width of each Linear/Conv, by name inside the user's model."""
    return {
        name.removeprefix("model."): int(getattr(m, "out_features", getattr(m, "out_channels", 0)))
        for name, m in module.named_modules()
        if _is_prunable(m)
    }


def _cuts(before: dict[str, int], after: dict[str, int]) -> dict[str, list[int]]:
    return {name: [n, after[name]] for name, n in before.items() if after[name] != n}
