"""Accuracy-aware int8 for ONNX models, on any runtime that reads ONNX: int8 where it is
harmless, float where it is not, chosen by measuring.

The invariant: every model this pass measures or writes is the same int8 model (ONNX Runtime's
static QDQ or dynamic quantization, made once) in which a set of nodes is given back its fp32
inputs; nothing else changes between candidates, so a difference in fidelity is the doing of
that set alone, and the model written is the last one measured. The set only grows: first from
the nodes that read a GELU output (the FFN down-projections, where BERT-style encoders are known
to break int8), then from the other quantized MatMul/Gemm/Conv nodes, each group in order of how
much keeping one node float helps on its own; it stops at the first set whose model meets the
budget on the evaluation batches (calibration plus the verification shapes), or raises
`Unsupported` once it would keep more than `max_float` of the nodes float.

Two things about ORT's static QDQ cost fidelity and buy no speed, so the int8 model here never
has them: it quantizes the outputs of MatMuls (a float bias add, GELU or softmax reads them),
and it routes every reader of a quantized tensor through the Q/DQ pair, the residual add that
reads a LayerNorm output and the add after the embeddings included, so the residual stream
itself, where the outliers live, is rounded to 8 bits. Here only int8 kernels read quantized
tensors. On all-MiniLM-L6-v2 that alone lifts the sentence embedding's mean cosine from 0.928 to
0.9895, at the same speed.

A pass; imports the layers below it and knows nothing of search or serving.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from mahir.errors import Unsupported, first_line
from mahir.measure import MeasureConfig, measure
from mahir.passes.quantize import choose_reduce_range
from mahir.quality import fidelity
from mahir.runtimes import open_session, reference_outputs
from mahir.silence import silenced
from mahir.types import Artifact, ArtifactFormat, OutputFidelity, Session
from mahir.workload import Batch

if TYPE_CHECKING:
    import onnx

    from mahir.passes import PassContext

# Ops that compute a GELU, or the erf of one taken apart (4 ops up from its output); a MatMul
# this near one is an FFN down-projection, whose input has the long one-sided tail that int8 clips.
_GELU = frozenset({"Gelu", "FastGelu", "BiasGelu", "Erf"})
_HOPS = 4
# Timing what the float nodes cost: a couple of seconds per model, interleaved.
_TIMING = MeasureConfig(warmup_runs=2, min_time_s=2.0, min_runs=5)


@dataclass(frozen=True, slots=True)
class AccuracyAwareInt8:
    """int8 with ONNX Runtime that keeps the most sensitive nodes in float until the headline
    output (the sentence embedding of a text encoder) is within the budget of the fp32
    original, on `ctx.calibration` plus mahir's verification shapes. `meta` names the nodes
    kept float, the fidelity before and after, and what the float nodes cost in speed.

    Measured on all-MiniLM-L6-v2 (AMD Zen 4 with VNNI, 2 busy cores, 4 batches of 8 to
    calibrate): static int8 alone reaches cosine mean 0.9895, worst 0.9802; keeping 1 of 48
    nodes float (the first FFN down-projection) gives 0.9913 / 0.9847 in 35-50 s, and
    0.9912 / 0.9868 on held-out batches (tests allow them 0.002 / 0.005 below the budget).
    Plain `StaticInt8` reaches 0.93 / 0.89 there."""

    mode: Literal["static", "dynamic"] = "static"
    """"static": weights and activations int8 as QDQ pairs, activation ranges calibrated on
    `ctx.calibration` (fastest); "dynamic": activations quantized per call."""
    min_cosine_mean: float = 0.99
    """Smallest mean cosine of the headline output to the fp32 original's that is accepted."""
    min_cosine_worst: float = 0.98
    """Smallest cosine of any one sample that is accepted."""
    max_float: float = 0.5
    """Largest share of the quantized nodes that may stay float (one stays int8 whatever it
    says); past it int8 buys too little and the pass raises `Unsupported`."""
    reduce_range: bool | None = None
    """7-bit weights; None: on when the CPU has no int8 dot-product instructions."""
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    """Ops to quantize (weights per channel); the rest stay float."""
    version: int = 1
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("onnx",)

    def __post_init__(self) -> None:
        if self.mode not in ("static", "dynamic"):
            raise ValueError(f"mode must be 'static' or 'dynamic', got {self.mode!r}")
        for name in ("min_cosine_mean", "min_cosine_worst"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1] (a cosine), got {value}")
        if not 0.0 < self.max_float <= 1.0:
            raise ValueError(
                f"max_float must be in (0, 1] (a share of nodes), got {self.max_float}"
            )
        if not self.op_types:
            raise ValueError("op_types is empty: name at least one op type to quantize")

    def slack(self, quality: OutputFidelity) -> float:
        """How far inside the budget (>= 0) or outside it (< 0) `quality` is, each bound in
        units of its distance from a perfect 1.0, the tighter of the two."""
        return min(
            _margin(quality.cosine_mean, self.min_cosine_mean),
            _margin(quality.cosine_min, self.min_cosine_worst),
        )


def accuracy_aware_int8(
    artifact: Artifact, config: AccuracyAwareInt8, ctx: PassContext
) -> Artifact:
    """int8 everywhere the fidelity budget allows, float where it does not (see the top)."""
    if not ctx.calibration:
        raise Unsupported("accuracy-aware int8 needs calibration inputs to measure fidelity on")
    with tempfile.TemporaryDirectory(prefix="fallback-", dir=ctx.workdir) as scratch:
        search = _Search(artifact, config, ctx, Path(scratch))
        before = search.quality(())
        chosen = () if config.slack(before) >= 0 else search.fall_back()
        out = ctx.workdir / "model.onnx"
        final = search.write(chosen, out)
        after = search.judge(final)  # the file on disk, measured again on every shape
        speed = _float_cost(search.write((), Path(scratch) / "int8.onnx"), final, chosen, ctx)
    return artifact.derive(
        out,
        quantized=f"accuracy-aware-{config.mode}-int8",
        reduce_range=search.reduce_range,
        budget={
            "min_cosine_mean": config.min_cosine_mean,
            "min_cosine_worst": config.min_cosine_worst,
        },
        float_nodes=list(chosen),
        float_count=len(chosen),
        quantized_total=len(search.quantized),
        fidelity_int8=_cosines(before),
        fidelity_final=_cosines(after),
        evaluated_on=search.described,
        speed=speed,
    )


class _Search:
    """The fp32 original, its int8 model, and the fidelity of the int8 model with a given set
    of nodes float, measured once per set on the evaluation batches."""

    def __init__(
        self, artifact: Artifact, config: AccuracyAwareInt8, ctx: PassContext, scratch: Path
    ) -> None:
        import onnx

        self.config, self.ctx, self.scratch, self.artifact = config, ctx, scratch, artifact
        self.batches: list[Batch] = [*ctx.calibration, *ctx.model.family.verification_batches()]
        self.reference = reference_outputs(ctx.model, self.batches)
        samples = sum(len(next(iter(b.values()))) for b in self.batches)
        self.described = f"{len(self.batches)} batches, {samples} samples"
        self._check_reachable()
        self.reduce_range = choose_reduce_range(config.reduce_range, True, ctx)  # per channel
        int8 = _quantize(artifact, config, self.reduce_range, ctx, scratch / "int8.onnx")
        self.graph = _FloatNodes(onnx.load(str(artifact.path)), int8, config.op_types)
        self.quantized = self.graph.quantized
        if not self.quantized:
            raise Unsupported(f"no {', '.join(config.op_types)} node was quantized")
        self._seen: dict[frozenset[str], OutputFidelity] = {}

    def _check_reachable(self) -> None:
        """The fp32 model itself on ONNX Runtime is the best any mix can do."""
        ceiling = self.judge(self.artifact)
        if self.config.slack(ceiling) < 0:
            raise Unsupported(
                f"even the fp32 model on ONNX Runtime reaches cosine mean "
                f"{ceiling.cosine_mean:.6f}, worst {ceiling.cosine_min:.6f}, short of the budget "
                f"{self.config.min_cosine_mean} / {self.config.min_cosine_worst}: loosen it"
            )

    def quality(self, float_nodes: Sequence[str]) -> OutputFidelity:
        """The headline fidelity with `float_nodes` float; ranking and greedy share results."""
        key = frozenset(float_nodes)
        if key not in self._seen:
            path = self.write(float_nodes, self.scratch / "candidate.onnx")
            self._seen[key] = self.judge(path)
        return self._seen[key]

    def judge(self, artifact: Artifact) -> OutputFidelity:
        session = open_session("onnxruntime", artifact)
        return fidelity(self.ctx.model, session, self.batches, self.reference).headline

    def write(self, float_nodes: Sequence[str], path: Path) -> Artifact:
        import onnx

        onnx.save(self.graph.build(float_nodes), str(path))
        return Artifact("onnx", self.artifact.spec, path=path)

    def fall_back(self) -> tuple[str, ...]:
        """Nodes to keep float, most helpful first, until the budget is met: the known
        outlier spots first, then the rest of the quantized nodes."""
        chosen: list[str] = []
        total = len(self.quantized)  # one node at least stays int8
        limit = min(math.floor(self.config.max_float * total), total - 1)
        known = self.graph.outlier_readers()
        for group in (known, [n for n in self.quantized if n not in known]):
            if len(chosen) >= limit:
                break
            for name in self._ranked(group, chosen):
                chosen.append(name)
                if self.config.slack(self.quality(chosen)) >= 0:
                    return tuple(chosen)
                if len(chosen) >= limit:
                    break
        quality = self.quality(chosen)
        raise Unsupported(
            f"with {len(chosen)} of {total} quantized nodes float (max_float "
            f"{self.config.max_float}), int8 reaches cosine mean {quality.cosine_mean:.6f}, "
            f"worst {quality.cosine_min:.6f}, short of the budget {self.config.min_cosine_mean} "
            f"/ {self.config.min_cosine_worst}: allow more float nodes or loosen the budget"
        )

    def _ranked(self, group: Sequence[str], chosen: Sequence[str]) -> list[str]:
        """`group` by the slack its node leaves when it alone joins the float nodes."""
        slack = {name: self.config.slack(self.quality([*chosen, name])) for name in group}
        return sorted(group, key=lambda name: -slack[name])


def _quantize(
    artifact: Artifact,
    config: AccuracyAwareInt8,
    reduce_range: bool,
    ctx: PassContext,
    out: Path,
) -> onnx.ModelProto:
    """Every `op_types` node in int8, weights per channel. Static QDQ leaves the quantized ops'
    outputs float: their readers (bias adds, GELU, softmax) are float ops."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    ops = list(config.op_types)
    common: dict[str, Any] = {
        "per_channel": True,
        "reduce_range": reduce_range,
        "weight_type": QuantType.QInt8,
        "op_types_to_quantize": ops,
    }
    float_default = {"DefaultTensorType": onnx.TensorProto.FLOAT}  # see quantize.py
    with silenced():  # onnxruntime.quantization logs a line per skipped node
        try:
            if config.mode == "dynamic":
                quantize_dynamic(
                    str(artifact.path), str(out), extra_options=float_default, **common
                )
            else:
                quantize_static(
                    str(artifact.path),
                    str(out),
                    _reader(ctx.calibration),
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8,
                    extra_options={**float_default, "OpTypesToExcludeOutputQuantization": ops},
                    **common,
                )
        except Exception as err:  # onnxruntime.quantization raises plain exceptions
            raise Unsupported(f"{config.mode} int8 quantization failed: {first_line(err)}") from err
    return onnx.load(str(out))


def _reader(batches: Sequence[Batch]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches = iter(batches)

        def get_next(self) -> Batch | None:
            return next(self._batches, None)

    return Batches()


class _FloatNodes:
    """Builds the int8 model with chosen nodes float: each gets back its fp32 node (the int8
    op or chain that computed its outputs is left unread and dropped), and every node that is
    not int8 reads the fp32 tensors it read in the original."""

    def __init__(
        self, original: onnx.ModelProto, int8: onnx.ModelProto, op_types: Sequence[str]
    ) -> None:
        import onnx

        self.nodes = {node.name: node for node in original.graph.node}
        fp32 = {init.name: init for init in original.graph.initializer}
        _rename_computed(int8.graph, set(fp32))
        self.int8_nodes = list(int8.graph.node)
        self.tensors = fp32 | {init.name: init for init in int8.graph.initializer}
        dequantized = {n.output[0] for n in int8.graph.node if n.op_type == "DequantizeLinear"}
        kept = {node.name: node for node in int8.graph.node}
        # Dynamic quantization replaces a node (its name disappears); QDQ feeds it DQ outputs.
        self.quantized = [
            node.name
            for node in original.graph.node
            if node.op_type in op_types
            and (node.name not in kept or any(i in dequantized for i in kept[node.name].input))
        ]
        self.shell = onnx.ModelProto()  # inputs, outputs, opsets and metadata
        self.shell.CopyFrom(int8)
        del self.shell.graph.node[:], self.shell.graph.initializer[:]

    def build(self, float_nodes: Sequence[str]) -> onnx.ModelProto:
        import onnx

        restored = {out: name for name in float_nodes for out in self.nodes[name].output}
        int8 = set(self.quantized) - set(float_nodes)
        nodes: list[onnx.NodeProto] = []
        for source in self.int8_nodes:
            node = onnx.NodeProto()
            node.CopyFrom(source)
            replaced = [out for out in node.output if out in restored]
            if replaced:  # computes a float node's output in int8: rename it, leave it unread
                node.name += "/int8"
                node.output[:] = [f"{out}/int8" if out in restored else out for out in node.output]
            elif node.name in self.nodes and node.name not in int8:
                node.input[:] = self.nodes[node.name].input
            nodes.append(node)
            nodes += [self.nodes[name] for name in dict.fromkeys(restored[o] for o in replaced)]
        model = onnx.ModelProto()
        model.CopyFrom(self.shell)
        model.graph.node.extend(_read_nodes(nodes, {o.name for o in model.graph.output}))
        read = {name for node in model.graph.node for name in _reads(node)}
        model.graph.initializer.extend(t for name, t in self.tensors.items() if name in read)
        return model

    def outlier_readers(self) -> list[str]:
        """Where BERT-style encoders are known to break int8, among the quantized nodes: the
        FFN down-projections, which read the GELU output. (The other known spots are float
        ops, the residual adds and the add before the softmax, which read float here.)"""
        producers = {out: node for node in self.nodes.values() for out in node.output}
        found = []
        for name in self.quantized:
            front, seen = [self.nodes[name]], set()
            for _ in range(_HOPS):
                front = [producers[i] for node in front for i in node.input if i in producers]
                seen |= {node.op_type for node in front}
            if seen & _GELU:
                found.append(name)
        return found


def _rename_computed(graph: onnx.GraphProto, weights: set[str]) -> None:
    """QDQ names a bias's DequantizeLinear output after the fp32 bias; a float node needs the
    fp32 initializer under that name, so the int8 graph's computed copy is renamed."""
    computed = {out for node in graph.node for out in node.output if out in weights}
    for node in graph.node:
        node.input[:] = [f"{name}/int8" if name in computed else name for name in node.input]
        node.output[:] = [f"{name}/int8" if name in computed else name for name in node.output]


def _read_nodes(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """`nodes` without those whose results nothing reads, repeated until none is left."""
    while True:
        read = outputs | {name for node in nodes for name in _reads(node)}
        kept = [node for node in nodes if any(out in read for out in node.output)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


def _reads(node: onnx.NodeProto) -> Iterator[str]:
    """The tensor names `node` reads, those its subgraphs (If, Loop) read included."""
    yield from node.input
    for attr in node.attribute:
        graphs = [attr.g, *attr.graphs] if attr.HasField("g") else list(attr.graphs)
        for graph in graphs:
            for inner in graph.node:
                yield from _reads(inner)


def _float_cost(
    int8: Artifact, final: Artifact, chosen: Sequence[str], ctx: PassContext
) -> dict[str, Any] | None:
    """p50 latency of the all-int8 and the final model on one calibration batch, timed
    interleaved on ONNX Runtime, and their ratio; None when no node stayed float."""
    if not chosen:
        return None
    batch = ctx.calibration[0]
    sessions: dict[str, Session] = {
        "int8": open_session("onnxruntime", int8),
        "final": open_session("onnxruntime", final),
    }
    perf = measure(sessions, [batch], _TIMING)
    int8_ms, final_ms = perf["int8"].p50_ms, perf["final"].p50_ms
    return {
        "batch": "x".join(str(d) for d in next(iter(batch.values())).shape),
        "int8_p50_ms": round(int8_ms, 3),
        "final_p50_ms": round(final_ms, 3),
        "float_cost": round(final_ms / int8_ms, 3),
        "noisy": perf["int8"].noisy or perf["final"].noisy,
    }


def _margin(value: float, bound: float) -> float:
    return (value - bound) / max(1.0 - bound, 1e-9)


def _cosines(q: OutputFidelity) -> dict[str, float]:
    return {"cosine_mean": round(q.cosine_mean, 6), "cosine_worst": round(q.cosine_min, 6)}
