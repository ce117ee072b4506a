"""PyTorch -> OpenVINO IR without ONNX, in the shape OpenVINO's CPU plugin runs fastest.

OpenVINO converts a `torch.export` program itself, keeping PyTorch's scaled-dot-product
attention as its own ScaledDotProductAttention op. Three things in the traced graph cost it
speed at run time, and each is put right here, exactly (the IR is verified like every export):

- transformers 5 builds a bidirectional padding mask as a full [batch, 1, queries, keys]
  boolean from index ranges. Exported models run a registered attention implementation
  (`mahir_sdpa`: transformers' own SDPA, a mask function of ours) whose padding-only mask is
  the [batch, 1, 1, keys] broadcast of the attention mask; every other mask transformers builds
  as before.
- A view's sizes come from the graph inputs (`input_ids.size(0)`), so OpenVINO cannot see
  that a reshape keeps its input's leading dimensions, and a `-1` hides the head count; each
  reshape then computes its target at run time. `tidy_views` takes each size that provably
  equals the viewed tensor's own from that tensor, writes the `-1` out where the size is known,
  and drops views that change nothing (one after every attention blocks the plugin's fusion of
  the output transpose into the attention op).

On all-MiniLM-L6-v2 int8, sentences of 64-128 tokens, this runs 1.07x faster than the plain
conversion and level with optimum-intel's IR (benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mahir.errors import BadInput, Unsupported, first_line
from mahir.export.onnx import EXPORTER_LOGGERS, switched_attention, verify
from mahir.files import staged
from mahir.model import Model
from mahir.silence import silenced
from mahir.types import Artifact

ATTENTION = "mahir_sdpa"


def export_openvino_direct(model: Model, source: Artifact, path: Path) -> Artifact:
    """Convert a torch artifact to OpenVINO IR through torch.export (each dynamic axis bounded
    by torch.export itself, which knows limits such as a maximum length), verified against
    `source` on the usual shapes. Raises `Unsupported` when the model does not trace."""
    import openvino as ov
    import torch

    from mahir.modules import PositionalInputs

    if source.format != "torch":
        raise Unsupported(f"{model.name}: only a torch module converts directly to OpenVINO")
    if path.suffix != ".xml":
        raise BadInput(f"an OpenVINO IR path ends in .xml, got {path}")
    names = model.spec.input_names
    adapter = PositionalInputs(source.module.eval(), names).eval()
    args = tuple(torch.from_numpy(model.example_inputs[n]) for n in names)
    dynamic = (
        tuple(
            {axis: torch.export.Dim.DYNAMIC for axis in t.dynamic_axes} for t in model.spec.inputs
        ),
    )
    with staged(path) as draft, silenced(EXPORTER_LOGGERS, ignore_warnings=True):
        try:
            with _padding_mask_attention(source.module):
                program = torch.export.export(adapter, args, dynamic_shapes=dynamic)
            ov_model = ov.convert_model(_decoder(program))
        except Exception as err:  # torch.export and OpenVINO raise many types; all: cannot
            raise Unsupported(
                f"cannot convert {model.name} to OpenVINO through torch.export: {first_line(err)}"
            ) from err
        for port, name in zip(ov_model.inputs, names, strict=True):
            port.get_tensor().set_names({name})
        for port, name in zip(ov_model.outputs, model.spec.outputs, strict=True):
            port.get_tensor().set_names({name})
        ov.save_model(ov_model, str(draft), compress_to_fp16=False)
        ir = Artifact("openvino", model.spec, path=draft)
        verify(model, ir, "openvino", what="IR converted through torch.export", reference=source)
    return Artifact("openvino", model.spec, path=path, meta=source.meta)


def _decoder(program: Any) -> Any:
    """OpenVINO's decoder of an FX graph, given the program lowered as OpenVINO's own
    converter lowers it (its ops kept whole, the rest decomposed) and then tidied."""
    from openvino.frontend.pytorch.fx_decoder import TorchFXPythonDecoder
    from openvino.frontend.pytorch.torchdynamo.export_decompositions import ops_to_not_decompose
    from torch.export.decomp_utils import CustomDecompTable

    table = CustomDecompTable()  # type: ignore[no-untyped-call]
    for op in ops_to_not_decompose():
        if op in table:
            table.pop(op)  # type: ignore[no-untyped-call]
    graph_module = program.run_decompositions(table).module()
    tidy_views(graph_module)
    return TorchFXPythonDecoder(graph_module, dynamic_shapes=True)


def tidy_views(graph_module: Any) -> int:
    """Rewrite every view and reshape so its target says what torch's symbolic shapes already
    prove: a size equal to the viewed tensor's own is read from that tensor, a size known to
    be a number is that number (no `-1`), and a view to the shape it already has is removed.
    Returns how many views changed. The outputs are the same by construction."""
    import torch

    views = (torch.ops.aten.view.default, torch.ops.aten.reshape.default)
    graph = graph_module.graph
    nodes = [n for n in graph.nodes if n.op == "call_function" and n.target in views]
    changed = sum(_tidy_view(graph, node) for node in nodes)
    graph.eliminate_dead_code()
    graph_module.recompile()
    return changed


def _tidy_view(graph: Any, node: Any) -> bool:
    import torch
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    source, target = node.args[0], list(node.args[1])
    have, want = source.meta["val"].shape, node.meta["val"].shape
    kept = [i < len(have) and statically_known_true(have[i] == want[i]) for i in range(len(want))]
    if len(have) == len(want) and all(kept):
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        return True
    tidy: list[Any] = []
    for i, size in enumerate(want):
        if isinstance(size, int):
            tidy.append(size)
        elif kept[i]:
            with graph.inserting_before(node):
                own = graph.call_function(torch.ops.aten.sym_size.int, (source, i))
            own.meta["val"] = have[i]
            tidy.append(own)
        else:
            tidy.append(target[i])
    if tidy == target:
        return False
    node.args = (source, tidy, *node.args[2:])
    return True


@contextlib.contextmanager
def _padding_mask_attention(module: Any) -> Iterator[None]:
    """Every transformers model inside `module` that runs SDPA runs `mahir_sdpa` for the
    export; switched back after."""
    _register_attention()
    with switched_attention(module, ATTENTION, only_from=("sdpa",)):
        yield


def _register_attention() -> None:
    """Register `mahir_sdpa` with transformers' attention and mask interfaces (their documented
    extension points; registering again replaces the entry with the same functions)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, sdpa_attention_forward)
    AttentionMaskInterface.register(ATTENTION, _padding_only_mask)


def _padding_only_mask(
    *, mask_function: Any = None, attention_mask: Any = None, **kwargs: Any
) -> Any:
    """transformers' SDPA mask, except a bidirectional mask with only padding in it: that is
    the [batch, 1, 1, keys] broadcast of the attention mask, which SDPA expands itself. Rows
    of queries at padded positions attend to the same keys as in the full mask."""
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask

    padding_only = (
        mask_function is bidirectional_mask_function
        and attention_mask is not None
        and attention_mask.dim() == 2
        and kwargs.get("kv_offset", 0) == 0
        and attention_mask.shape[-1] == kwargs["kv_length"]
    )
    if padding_only:
        return attention_mask[:, None, None, :].bool()
    return sdpa_mask(mask_function=mask_function, attention_mask=attention_mask, **kwargs)
