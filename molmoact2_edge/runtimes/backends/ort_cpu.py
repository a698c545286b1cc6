"""Load-time rewrites of a bundle graph for onnxruntime's CPU provider, cached per device.

A bundle's graphs stay standard ONNX inside the TensorRT allow-list (``export/opset_check.py``);
what runs fastest on an x86 CPU is not that form, so the onnxruntime backend rewrites each
graph once when it loads on the CPU provider and caches the result beside nothing in the
bundle (``$XDG_CACHE_HOME/molmo-edge/ort_cpu/<key>``; the key covers the graph files, this
module's rewrite version, onnxruntime's version and the CPU):

- **RMSNorm fusion**: the exporter writes ``x * 1/sqrt(mean(x^2) + eps) [* w]`` as six
  or seven ops (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul), which onnxruntime's own
  LayerNorm fusions do not match; they become one ``SimplifiedLayerNormalization`` (an
  onnxruntime kernel in the default domain; weightless norms get a ones scale).
- **Dynamic int8 from QDQ**: an int8 bundle's ``MatMul(Q/DQ(x), DequantizeLinear(W_int8))``
  runs on the CPU provider as dequantize-then-fp32-GEMM, slower than fp32. It becomes
  ``com.microsoft.DynamicQuantizeMatMul(x, W_int8, w_scale, 0)``: the bundle's own int8
  weights and per-channel scales, the activation quantized per call (u8 x s8, VNNI where the
  CPU has it), the layer's bias added by the kernel instead of a separate Add. The static
  activation scale is dropped, so the CPU result is at least as close to fp32 as the QDQ
  graph's; the parity gate runs through this same backend.
- **Embedding tables**: ``DequantizeLinear(int8 table) -> Gather`` is dequantized once here
  instead of on every call.

- **adaLN**: onnxruntime's basic (portable) pass first folds every constant subgraph, which
  includes the expert's adaLN modulation of each unrolled flow step (the flow time is fixed);
  ``norm(x) * (1 + scale)`` then becomes one ``SimplifiedLayerNormalization`` whose scale is
  ``1 + scale``.

- **Rotary embeddings**: ``x * cos + rotate_half(x) * sin`` (seven ops) with cos/sin constant
  per position (the flow's action tokens, a prefill bucket) becomes one
  ``com.microsoft.RotaryEmbedding``. Decode graphs, whose position is an input, keep the ops.

- **Residual norms**: ``Add(a, b) -> SimplifiedLayerNormalization`` becomes one
  ``com.microsoft.SkipSimplifiedLayerNormalization`` whose fourth output is the sum.
- **adaLN modulations** (int8): the dynamic GEMMs of one input that are each split along their
  last axis (every block's modulation of the time embedding) become one GEMM and one Split,
  and adaLN's ``1 + scale`` goes into that GEMM's bias instead of an Add per norm.
- **Heads**: a fused QKV projection viewed as (b, t, 3, heads, head_dim) and picked apart with
  scalar Gathers becomes one Split of the merged (3 x heads) axis (onnxruntime would make a
  Split and a Squeeze per part).

- **Constant cones through QDQ**: onnxruntime's constant folding stops at ``DequantizeLinear``,
  so in an int8 graph a subgraph computed from weights alone (the flow's time-embedding MLP
  and adaLN modulation GEMMs once the time is fixed) still runs on every call. Every tensor
  computable from initializers alone that a non-constant node reads is evaluated here, once,
  by onnxruntime on this graph's own nodes (so exactly as the QDQ graph defines it), except
  a quantized weight itself (a ``DequantizeLinear`` output, possibly transposed or reshaped),
  which stays for the dynamic int8 GEMM.
- **Zero-input variants** (``zero_inputs``): the same rewrite of a graph with some inputs
  fixed to zeros, for the backend to run when those feeds are all zero. The flow graph's RTC
  inputs are zero whenever no prefix is committed (RTC off, the first chunk of a run, ``act``
  without a prefix); with them fixed, the per-token flow time is the step's constant time, so the
  whole time embedding and every adaLN modulation fold away (the bundled checkpoint's flow graph:
  fp32 2497 -> 1963 nodes, int8 1757 -> 1413), and in int8 graphs the adaLN gate, a constant per
  output feature, goes into the dynamic GEMM's per-column weight scale.

Everything else (GEMM+bias, GELU, ...) is left to onnxruntime's own ``ORT_ENABLE_ALL``
optimizer at session creation. Attention is not fused (still FusedMatMul, Add, Softmax, MatMul):
``MultiHeadAttention`` was measured on the flow graph and was no faster (``docs/design.md``).
On the bundled checkpoint, counted after onnxruntime's own fusions, the int8 flow graph runs
1589 nodes instead of 4329 as the bundle has it (2657 with the first two rewrites); the graph
is dispatch-bound: 10 Euler steps of GEMMs over 10 action tokens.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

REWRITE_VERSION = 11  # bump when a rewrite changes: cached graphs of older versions are not reused
MS_DOMAIN = "com.microsoft"
# ops whose output is not a function of their inputs, or that hold subgraphs: never evaluated ahead of time
_NOT_FOLDABLE = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
     "If", "Loop", "Scan"}
)  # fmt: skip


def default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "molmo-edge" / "ort_cpu"


def _cpu_id() -> str:
    """The CPU model and flags: a rewrite tuned on one CPU is not reused on another."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        fields = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
        return "|".join(fields)
    except OSError:
        return platform.processor() or platform.machine()


def cache_key(path: Path, fuse: bool, dynamic_int8: bool, zero_inputs: tuple[str, ...] = ()) -> str:
    digest = hashlib.sha256()
    parts = (str(REWRITE_VERSION), ort.__version__, _cpu_id(), str(fuse), str(dynamic_int8), str(path.resolve()))
    for part in (*parts, *(f"zero:{name}" for name in zero_inputs)):
        digest.update(part.encode())
    for file in (path, path.with_name(path.name + ".data")):
        if file.is_file():
            stat = file.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def prepare(
    path: Path,
    cache_root: Path | None = None,
    fuse: bool = True,
    dynamic_int8: bool = True,
    shared_pool: bool = False,
    zero_inputs: tuple[str, ...] = (),
) -> Path:
    """The graph to load on the CPU provider: a cached rewrite of ``path``, or ``path`` when nothing applies.

    shared_pool: this process has onnxruntime's global thread pool (its sessions must use it).
    zero_inputs: graph inputs fixed to zeros (they become constants); the result then has no such inputs and
    is only valid for calls whose feeds for them are all zero.
    """
    out = (cache_root or default_cache_root()) / cache_key(path, fuse, dynamic_int8, zero_inputs) / path.name
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    source = _with_zero_inputs(path, out.parent, zero_inputs) if zero_inputs else path
    model = _constant_folded(source, out.parent, shared_pool) if fuse else onnx.load(str(source))
    if source != path:
        source.unlink()
        source.with_name(source.name + ".data").unlink(missing_ok=True)
    graph = _Graph(model)
    # in this order: each rewrite matches what the ones before it left (a dict literal runs them in order)
    counts = {
        "zero_inputs": len(zero_inputs),
        "constant_cones": graph.fold_constant_cones(shared_pool) if fuse else 0,
        "gather_tables": graph.dequantize_gather_tables(),
        "dynamic_int8": graph.qdq_to_dynamic() if dynamic_int8 else 0,
        "rms_norm": graph.fuse_rms_norm() if fuse else 0,
        "adaln": graph.fold_modulation_scale() if fuse else 0,
        "adaln_gates": graph.fold_gate_scale() if fuse and dynamic_int8 else 0,
        "rotary": graph.fuse_rotary() if fuse else 0,
        "merged_gemms": graph.merge_sibling_gemms() if fuse and dynamic_int8 else 0,
        "split_offsets": graph.fold_split_offsets() if fuse and dynamic_int8 else 0,
        "skip_norm": graph.fuse_skip_norm() if fuse else 0,
        "split_heads": graph.split_heads() if fuse else 0,
    }
    if not any(counts.values()):
        return path
    graph.drop_dead()
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    onnx.save(model, str(tmp), save_as_external_data=True, location=tmp.name + ".data")
    if tmp.with_name(tmp.name + ".data").is_file():  # small graphs keep every tensor inline
        os.replace(tmp.with_name(tmp.name + ".data"), out.with_name(out.name + ".data"))
    # the external-data location recorded in the graph must name the final file
    saved = onnx.load(str(tmp), load_external_data=False)
    for init in saved.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = out.name + ".data"
    onnx.save(saved, str(tmp))
    os.replace(tmp, out)
    log.info("onnxruntime CPU rewrite of %s: %s -> %s", path.name, counts, out)
    return out


def _with_zero_inputs(path: Path, workdir: Path, names: tuple[str, ...]) -> Path:
    """A copy of the graph at ``path`` (in ``workdir``) whose inputs ``names`` are zero initializers."""
    model = onnx.load(str(path))
    inputs = {i.name: i for i in model.graph.input}
    missing = [name for name in names if name not in inputs]
    if missing:
        raise ValueError(f"{path.name}: no input(s) {missing} to fix to zero (inputs: {sorted(inputs)})")
    for name in names:
        tensor = inputs[name].type.tensor_type
        shape = [d.dim_value for d in tensor.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(shape, dtype), name))
        model.graph.input.remove(inputs[name])
    out = workdir / f"zero-{os.getpid()}.onnx"
    onnx.save(model, str(out), save_as_external_data=True, location=out.name + ".data")
    return out


def _constant_folded(path: Path, workdir: Path, shared_pool: bool) -> onnx.ModelProto:
    """onnxruntime's own basic-level pass (constant folding, no hardware-specific or contrib rewrites), saved.

    It evaluates everything that depends only on constants, e.g. the expert's adaLN modulation
    of each unrolled flow step (a function of the fixed flow time), so the fusions below see
    shift and scale as constants. QDQ is kept: onnxruntime does not fold DequantizeLinear.
    """
    folded = workdir / f"folded-{os.getpid()}.onnx"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(folded)
    so.log_severity_level = 3
    if shared_pool:
        so.use_per_session_threads = False
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", folded.name + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    model = onnx.load(str(folded))
    folded.unlink()
    folded.with_name(folded.name + ".data").unlink(missing_ok=True)
    return model


@dataclass(frozen=True)
class _SplitGemm:
    """A biased dynamic int8 GEMM read only by a Split of its last axis, and its constants."""

    gemm: onnx.NodeProto
    split: onnx.NodeProto
    weight: np.ndarray  # (k, n) int8
    scale: np.ndarray  # (n,) per column
    bias: np.ndarray  # (n,)
    sizes: np.ndarray  # the Split's chunk widths


class _Graph:
    """Producer/consumer maps over one model's graph, and the rewrites."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model, self.g = model, model.graph
        self.inits = {init.name: init for init in self.g.initializer}
        # inferred once, before any rewrite: onnx's shape inference does not know the fused (contrib) ops, and
        # every rewrite keeps the names of the tensors it replaces
        self.shapes = _static_shapes(model)
        self._index()

    def _index(self) -> None:
        self.producer = {out: node for node in self.g.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.g.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.outputs = {o.name for o in self.g.output}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def drop_dead(self) -> None:
        """Remove nodes whose outputs nothing reads, and unused initializers."""
        while True:
            self._index()
            live = [n for n in self.g.node if any(o in self.outputs or self.consumers.get(o) for o in n.output)]
            if len(live) == len(self.g.node):
                break
            del self.g.node[:]
            self.g.node.extend(live)
        used = {name for node in self.g.node for name in node.input}
        kept = [init for init in self.g.initializer if init.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(kept)
        self.inits = {init.name: init for init in self.g.initializer}

    def _add_init(self, array: np.ndarray, name: str) -> str:
        """A new initializer; one already added under ``name`` (a weight shared by unrolled steps) is reused."""
        if name in self.inits:
            if not np.array_equal(numpy_helper.to_array(self.inits[name]), array):
                raise ValueError(f"onnxruntime CPU rewrite: two different constants named {name!r}")
            return name
        self.g.initializer.append(numpy_helper.from_array(array, name))
        self.inits[name] = self.g.initializer[-1]
        return name

    def _replace(self, old: list[onnx.NodeProto], new: list[onnx.NodeProto]) -> None:
        """``new`` where the first of ``old`` was, ``old`` gone. The callers' patterns guarantee that every input of
        ``new`` is computed before that node and every reader of its outputs comes after it. Not reindexed."""
        position = min(list(self.g.node).index(n) for n in old)
        for n in old:
            self.g.node.remove(n)
        for offset, node in enumerate(new):
            self.g.node.insert(position + offset, node)

    def _read_instead(self, old: str, new: str) -> None:
        """Every node that reads tensor ``old`` reads ``new``."""
        for user in self.consumers.get(old, []):
            for i, name in enumerate(user.input):
                if name == old:
                    user.input[i] = new

    # --- rewrites ---------------------------------------------------------------------

    def fold_constant_cones(self, shared_pool: bool) -> int:
        """Evaluate each tensor computed from initializers alone that a non-constant node (or the graph's output)
        reads, and make it an initializer; quantized weights (``DequantizeLinear`` outputs, through layout ops)
        are left for ``qdq_to_dynamic``. Returns how many tensors were folded."""
        constant = set(self.inits)
        cone: list[onnx.NodeProto] = []
        for node in self.g.node:  # ONNX nodes are topologically sorted
            if node.op_type in _NOT_FOLDABLE or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Constant" or all(not name or name in constant for name in node.input):
                cone.append(node)
                constant.update(node.output)
        self._index()
        in_cone = {id(node) for node in cone}
        frontier = [
            out
            for node in cone
            if node.op_type != "Constant"
            for out in node.output
            if not self._is_weight(out)
            and (out in self.outputs or any(id(user) not in in_cone for user in self.consumers.get(out, [])))
        ]
        if not frontier:
            return 0
        try:
            values = self._evaluate(cone, frontier, shared_pool)
        except Exception as err:  # onnxruntime's failures have no common base; the graph is still valid unfolded
            log.warning("onnxruntime CPU rewrite: constant subgraphs left unfolded (%s)", err)
            return 0
        producers = {id(self.producer[name]): self.producer[name] for name in frontier}
        for node in producers.values():
            self.g.node.remove(node)
        for name, value in zip(frontier, values, strict=True):
            self._add_init(np.asarray(value), name)
        self.drop_dead()  # the rest of each cone, now unread
        return len(frontier)

    def _is_weight(self, name: str) -> bool:
        """A quantized weight: the output of a ``DequantizeLinear``, possibly through layout-only ops."""
        node = self.producer.get(name)
        while node is not None and node.op_type in ("Transpose", "Reshape", "Identity", "Unsqueeze", "Squeeze"):
            node = self.producer.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    def _evaluate(self, nodes: list[onnx.NodeProto], names: list[str], shared_pool: bool) -> list[np.ndarray]:
        """Run ``nodes`` (which read initializers only) on onnxruntime's CPU provider; the tensors ``names``."""
        used = {name for node in nodes for name in node.input}
        graph = helper.make_graph(
            nodes,
            "constant_cones",
            [],
            [onnx.ValueInfoProto(name=name) for name in names],
            [init for init in self.g.initializer if init.name in used],
        )
        model = helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the nodes as written
        so.log_severity_level = 3
        if shared_pool:
            so.use_per_session_threads = False
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return session.run(names, {})

    def dequantize_gather_tables(self) -> int:
        count = 0
        for node in list(self.g.node):
            if node.op_type != "DequantizeLinear" or not all(n.op_type == "Gather" for n in self.consumers[node.output[0]]):
                continue
            q, scale = self.const(node.input[0]), self.const(node.input[1])
            if q is None or scale is None or q.ndim != 2:
                continue
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            zero = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            shift = q.astype(np.float32) - (0 if zero is None else np.expand_dims(zero, 1 - axis % 2).astype(np.float32))
            table = shift * (scale if scale.ndim == 0 else np.expand_dims(scale, 1 - axis % 2))
            self._add_init(table.astype(np.float32), node.output[0])
            self.g.node.remove(node)
            count += 1
        self._index()
        return count

    def bypass_activation_qdq(self) -> int:
        """Consumers of DQ(Q(x)) read x: the static fake-quantization of activations goes (the GEMMs quantize
        their input per call instead)."""
        count = 0
        for dq in list(self.g.node):
            q = self.producer.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear":
                continue
            if dq.output[0] in self.outputs:  # a graph output keeps its name
                position = list(self.g.node).index(dq)
                self.g.node.remove(dq)
                self.g.node.insert(position, helper.make_node("Identity", [q.input[0]], [dq.output[0]]))
                count += 1
                continue
            self._read_instead(dq.output[0], q.input[0])
            count += 1
        self.drop_dead()  # the bypassed QuantizeLinears, so they do not count as consumers below
        return count

    def qdq_to_dynamic(self) -> int:
        """MatMul(x, DQ(W int8, per-column or per-tensor scale)) -> DynamicQuantizeMatMul; activation Q/DQ bypassed."""
        if not self.bypass_activation_qdq() and not any(n.op_type == "DequantizeLinear" for n in self.g.node):
            return 0
        count = 0
        for node in list(self.g.node):
            if node.op_type != "MatMul":
                continue
            dq = self.producer.get(node.input[1])
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            w, scale = self.const(dq.input[0]), self.const(dq.input[1])
            zero = self.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            if w is None or scale is None or w.dtype != np.int8 or w.ndim != 2:
                continue
            if scale.ndim == 1 and (axis % 2 != 1 or scale.shape[0] != w.shape[1]):
                continue  # only per-column (or per-tensor) scales map onto DynamicQuantizeMatMul
            if zero is not None and np.any(zero != 0):
                continue
            zero_name = self._add_init(np.zeros(scale.shape, np.int8), f"{dq.input[0]}_dyn_zero")
            inputs, output = [node.input[0], dq.input[0], dq.input[1], zero_name], node.output[0]
            bias_add = self._bias_add(output, w.shape[1])
            if bias_add is not None:  # the kernel adds the bias itself: one node fewer per GEMM
                inputs.append(bias_add.input[1] if bias_add.input[0] == output else bias_add.input[0])
                output = bias_add.output[0]
                self.g.node.remove(bias_add)  # after ``node``, which the fused GEMM replaces
            fused = helper.make_node(
                "DynamicQuantizeMatMul",
                inputs,
                [output],
                name=f"{node.name or 'MatMul'}_dynamic_int8",
                domain=MS_DOMAIN,
            )
            self._replace([node], [fused])
            count += 1
        if count:
            self._ensure_domain(MS_DOMAIN)
        self._index()
        return count

    def _bias_add(self, name: str, width: int) -> onnx.NodeProto | None:
        """The Add that is ``name``'s only consumer when its other input is a constant (width,) float32 bias."""
        add = self.only_consumer(name)
        if add is None or add.op_type != "Add":
            return None
        bias = self.const(add.input[1] if add.input[0] == name else add.input[0])
        return add if bias is not None and bias.dtype == np.float32 and bias.shape == (width,) else None

    def fuse_rms_norm(self) -> int:
        """Pow(x,2) -> ReduceMean(-1) -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x) [-> Mul(w)] -> SimplifiedLayerNormalization."""
        count = 0
        for mean in list(self.g.node):
            if mean.op_type != "ReduceMean":
                continue
            chain = self._rms_chain(mean)
            if chain is None:
                continue
            x, eps, width, nodes, weight, out = chain
            scale = weight if weight is not None else self._add_init(np.ones(width, np.float32), f"{out}_ones")
            fused = helper.make_node(
                "SimplifiedLayerNormalization", [x, scale], [out], name=f"{out}_rms_norm", axis=-1, epsilon=eps
            )
            self._replace(nodes, [fused])
            self._index()
            count += 1
        return count

    def fold_modulation_scale(self) -> int:
        """adaLN: SimplifiedLayerNormalization(x, s) * C, C constant per feature -> SimplifiedLayerNormalization(x, s*C).

        ``modulate(norm(x), shift, scale) = norm(x) * (1 + scale) + shift``: once the modulation is
        constant-folded, ``1 + scale`` is a per-feature constant that the norm's own scale absorbs.
        """
        count = 0
        for norm in list(self.g.node):
            if norm.op_type != "SimplifiedLayerNormalization":
                continue
            mul = self.only_consumer(norm.output[0])
            scale = self.const(norm.input[1])
            if mul is None or mul.op_type != "Mul" or scale is None:
                continue
            factor = self._per_feature(self._other_input(mul, norm.output[0]), scale.size)
            if factor is None:
                continue
            merged = self._add_init((scale * factor).astype(np.float32), f"{norm.name}_modulated_scale")
            norm.input[1] = merged
            norm.output[0] = mul.output[0]
            self.g.node.remove(mul)
            self._index()
            count += 1
        return count

    def fold_gate_scale(self) -> int:
        """adaLN's gate: DynamicQuantizeMatMul(x, W, s[, b]) * g, g constant per output feature ->
        DynamicQuantizeMatMul(x, W, s*g[, b*g]). Exact: the int8 weights are per-column scaled anyway."""
        count = 0
        for gemm in list(self.g.node):
            if gemm.op_type != "DynamicQuantizeMatMul":
                continue
            mul, scale = self.only_consumer(gemm.output[0]), self.const(gemm.input[2])
            if mul is None or mul.op_type != "Mul" or scale is None:
                continue
            width = scale.size if scale.ndim == 1 else self.shapes.get(gemm.output[0], (0,))[-1]
            gate = self._per_feature(self._other_input(mul, gemm.output[0]), width)
            if gate is None:
                continue
            inputs = list(gemm.input)
            has_bias = len(inputs) > 4 and bool(inputs[4])
            bias = self.const(inputs[4]) if has_bias else None
            if has_bias and bias is None:
                continue  # a bias computed at run time cannot take the gate
            inputs[2] = self._add_init((scale * gate).astype(np.float32), f"{mul.output[0]}_gated_scale")
            inputs[3] = self._add_init(np.zeros(width, np.int8), f"{mul.output[0]}_gated_zero")  # per column now
            if bias is not None:
                inputs[4] = self._add_init((bias * gate).astype(np.float32), f"{mul.output[0]}_gated_bias")
            gated = helper.make_node(
                "DynamicQuantizeMatMul", inputs, [mul.output[0]], name=f"{gemm.name}_gated", domain=MS_DOMAIN
            )
            self._replace([gemm, mul], [gated])
            self._index()
            count += 1
        return count

    @staticmethod
    def _other_input(node: onnx.NodeProto, name: str) -> str:
        """The input of a binary ``node`` that is not ``name``."""
        return node.input[1] if node.input[0] == name else node.input[0]

    def _per_feature(self, name: str, width: int) -> np.ndarray | None:
        """Constant ``name`` as one (width,) float32 vector, when it is one broadcast over the leading axes (every
        row equal: the flow's per-token modulation once the time is the same for all tokens); else None."""
        value = self.const(name)
        if value is None or value.dtype != np.float32 or width <= 0 or value.ndim == 0 or value.shape[-1] != width:
            return None
        rows = value.reshape(-1, width)
        return rows[0] if np.all(rows == rows[:1]) else None

    def merge_sibling_gemms(self) -> int:
        """Dynamic int8 GEMMs that read one input, each split along its last axis -> one GEMM, one Split.

        The expert's adaLN: every block's modulation (and the final layer's) is a linear map of the
        same time embedding, split into shift / scale / gate chunks. One GEMM over the concatenated
        weights quantizes that input once and launches once per flow step instead of four times.
        """
        count = 0
        for name in list(self.consumers):
            readers = [
                node for node in self.consumers[name] if node.input[0] == name
            ]  # as the input, not a weight
            members = [m for m in map(self._split_gemm, readers) if m is not None]
            if len(members) < 2:
                continue
            key = hashlib.sha256("|".join(m.gemm.input[1] for m in members).encode()).hexdigest()[:12]
            sizes = np.concatenate([m.sizes for m in members])
            inputs = [
                name,
                self._add_init(np.concatenate([m.weight for m in members], axis=1), f"merged_{key}_w"),
                self._add_init(np.concatenate([m.scale for m in members]), f"merged_{key}_scale"),
                self._add_init(np.zeros(int(sizes.sum()), np.int8), f"merged_{key}_zero"),
                self._add_init(np.concatenate([m.bias for m in members]), f"merged_{key}_bias"),
            ]
            merged = f"{members[0].gemm.output[0]}_merged"
            fused = [
                helper.make_node("DynamicQuantizeMatMul", inputs, [merged], name=merged, domain=MS_DOMAIN),
                helper.make_node(
                    "Split",
                    [merged, self._add_init(sizes, f"merged_{key}_sizes")],
                    [out for m in members for out in m.split.output],
                    name=f"{merged}_split",
                    axis=-1,
                ),
            ]
            self._replace([node for m in members for node in (m.gemm, m.split)], fused)
            self._index()
            count += 1
        return count

    def _split_gemm(self, node: onnx.NodeProto | None) -> _SplitGemm | None:
        """A biased dynamic int8 GEMM whose only reader is a last-axis Split, with its constants; else None."""
        if node is None or node.op_type != "DynamicQuantizeMatMul" or len(node.input) != 5:
            return None
        weight, scale, zero, bias = (self.const(node.input[i]) for i in (1, 2, 3, 4))
        split = self.only_consumer(node.output[0])
        if (
            weight is None
            or weight.ndim != 2
            or scale is None
            or zero is None
            or np.any(zero)
            or bias is None
        ):
            return None
        if split is None or split.op_type != "Split" or split.input[0] != node.output[0]:
            return None
        rank = len(
            self.shapes.get(node.output[0], ())
        )  # unknown (0) for a merged GEMM's output: axis -1 then
        axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
        if axis != -1 and (rank == 0 or axis != rank - 1):
            return None
        sizes = self._split_sizes(split, weight.shape[1])
        if sizes is None:
            return None
        per_column = np.broadcast_to(scale, (weight.shape[1],)).astype(np.float32)
        return _SplitGemm(node, split, weight, per_column, bias.astype(np.float32), sizes)

    def _split_sizes(self, split: onnx.NodeProto, width: int) -> np.ndarray | None:
        """The chunk widths of a Split of ``width`` features (its ``split`` input, or equal parts)."""
        if len(split.input) > 1 and split.input[1]:
            sizes = self.const(split.input[1])
            return sizes.astype(np.int64) if sizes is not None and int(sizes.sum()) == width else None
        parts = len(split.output)
        return np.full(parts, width // parts, np.int64) if width % parts == 0 else None

    def fold_split_offsets(self) -> int:
        """``Add(chunk, c)``, the chunk a Split output of a biased int8 GEMM read only there -> c goes into the bias.

        adaLN's ``1 + scale``: the constant 1 joins the modulation's bias once instead of costing an Add
        per norm per flow step."""
        count = 0
        for add in list(self.g.node):
            if add.op_type != "Add" or add.output[0] in self.outputs:
                continue
            for chunk, other in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
                offset, split = self.const(other), self.producer.get(chunk)
                if offset is None or offset.size != 1 or split is None or split.op_type != "Split":
                    continue
                member = self._split_gemm(self.producer.get(split.input[0]))
                if member is None or chunk in self.outputs or len(self.consumers[chunk]) != 1:
                    continue  # the chunk has readers besides this Add
                index = list(split.output).index(chunk)
                start = int(member.sizes[:index].sum())
                bias = member.bias.copy()
                bias[start : start + int(member.sizes[index])] += np.float32(offset.ravel()[0])
                member.gemm.input[4] = self._add_init(bias, f"{member.gemm.input[4]}_plus{index}")
                self._read_instead(add.output[0], chunk)
                self.g.node.remove(add)
                self._index()
                count += 1
                break
        return count

    def split_heads(self) -> int:
        """``Reshape(x, (.., 3, N, hd, ..))`` read only by one scalar ``Gather`` per index of the ``3`` axis
        -> ``Reshape(x, (.., 3N, hd, ..))`` and one ``Split`` of N-row chunks.

        The attention's fused QKV projection, viewed as (b, t, 3, heads, head_dim) and picked apart with
        ``select``: onnxruntime turns the Gathers into a Split plus a Squeeze per part; split along the
        merged axis instead, the parts already have their final shape.
        """
        count = 0
        for view in list(self.g.node):
            if view.op_type != "Reshape" or view.output[0] in self.outputs:
                continue
            shape, readers = self.const(view.input[1]), self.consumers.get(view.output[0], [])
            picks = [p for p in map(self._scalar_gather, readers) if p is not None]
            if (
                shape is None
                or shape.ndim != 1
                or (shape <= 0).any()
                or not picks
                or len(picks) != len(readers)
            ):
                continue
            axes = {axis % len(shape) for axis, _ in picks}
            axis = axes.pop() if len(axes) == 1 else -1
            if (
                axis < 0
                or axis + 1 >= len(shape)
                or sorted(i for _, i in picks) != list(range(int(shape[axis])))
            ):
                continue
            parts, rows = int(shape[axis]), int(shape[axis + 1])
            merged = np.concatenate([shape[:axis], [parts * rows], shape[axis + 2 :]]).astype(np.int64)
            view.input[1] = self._add_init(merged, f"{view.output[0]}_merged_shape")
            by_index = {index: g.output[0] for g, (_, index) in zip(readers, picks, strict=True)}
            split = helper.make_node(
                "Split",
                [
                    view.output[0],
                    self._add_init(np.full(parts, rows, np.int64), f"{view.output[0]}_split_rows"),
                ],
                [by_index[i] for i in range(parts)],
                name=f"{view.output[0]}_heads",
                axis=axis,
            )
            self._replace(readers, [split])
            self._index()
            count += 1
        return count

    def _scalar_gather(self, node: onnx.NodeProto) -> tuple[int, int] | None:
        """(axis, index) of a Gather with a constant scalar index, else None."""
        index = self.const(node.input[1]) if node.op_type == "Gather" else None
        if index is None or index.ndim != 0:
            return None
        return next((a.i for a in node.attribute if a.name == "axis"), 0), int(index)

    def fuse_skip_norm(self) -> int:
        """Residual ``Add(a, b)`` -> ``SimplifiedLayerNormalization`` -> ``com.microsoft.SkipSimplifiedLayerNormalization``,
        whose fourth output is the sum the residual stream reads on."""
        count = 0
        for norm in list(self.g.node):
            add = self.producer.get(norm.input[0]) if norm.op_type == "SimplifiedLayerNormalization" else None
            if add is None or add.op_type != "Add" or any(self.const(x) is not None for x in add.input):
                continue
            a, b = (self.shapes.get(x) for x in add.input)
            if a is None or a != b or len(a) != 3 or min(a) < 1:
                continue
            eps = next((attr.f for attr in norm.attribute if attr.name == "epsilon"), 1e-5)
            sum_name = (
                add.output[0]
                if self.consumers[add.output[0]] != [norm] or add.output[0] in self.outputs
                else ""
            )
            fused = helper.make_node(
                "SkipSimplifiedLayerNormalization",
                [add.input[0], add.input[1], norm.input[1]],
                [norm.output[0], "", "", sum_name],
                name=f"{norm.output[0]}_skip_norm",
                domain=MS_DOMAIN,
                epsilon=eps,
            )
            self._replace([add, norm], [fused])
            self._index()
            count += 1
        if count:
            self._ensure_domain(MS_DOMAIN)
        return count

    def fuse_rotary(self) -> int:
        """``x * cos + rotate_half(x) * sin`` with cos/sin constant per position -> ``com.microsoft.RotaryEmbedding``.

        The exporter writes rotary embeddings as seven ops (two Slices, Neg, Concat, two Muls, Add);
        with the positions fixed (the flow's action tokens, a prefill bucket) cos and sin are
        constants, so the fused kernel gets them as its cache and positions 0..S-1. Keys arrive
        as (B, S, N, H) and the kernel takes (B, N, S, H): a Transpose pair goes around it, which
        onnxruntime's transpose optimizer merges with the attention's own.
        """
        count = 0
        for neg in list(self.g.node):
            match = self._rotary_match(neg) if neg.op_type == "Neg" else None
            if match is None:
                continue
            x, seq_axis, cos, sin, nodes = match
            out = nodes[-1].output[0]
            batch, length = self.shapes[x][0], cos.shape[0]
            pos = self._add_init(
                np.tile(np.arange(length, dtype=np.int64), (batch, 1)), f"rotary_positions_{batch}x{length}"
            )
            cos_name = self._add_init(cos, f"{out}_cos_cache")
            sin_name = self._add_init(sin, f"{out}_sin_cache")
            bnsh = seq_axis == 2  # already (B, N, S, H); else a Transpose pair goes around the kernel
            src, dst = (x, out) if bnsh else (f"{out}_bnsh", f"{out}_rotated")
            rotary = helper.make_node(
                "RotaryEmbedding", [src, pos, cos_name, sin_name], [dst], name=f"{out}_rotary", domain=MS_DOMAIN,
                interleaved=0,
            )  # fmt: skip
            fused = [rotary] if bnsh else [
                helper.make_node("Transpose", [x], [src], perm=[0, 2, 1, 3]),
                rotary,
                helper.make_node("Transpose", [dst], [out], perm=[0, 2, 1, 3]),
            ]  # fmt: skip
            self._replace(nodes, fused)
            self._index()
            count += 1
        if count:
            self._ensure_domain(MS_DOMAIN)
        return count

    def _rotary_match(
        self, neg: onnx.NodeProto
    ) -> tuple[str, int, np.ndarray, np.ndarray, list[onnx.NodeProto]] | None:
        """(x, the axis positions run along, cos cache (S, H/2), sin cache, the pattern's nodes, Add last)."""
        hi = self.producer.get(neg.input[0])
        cat = self.only_consumer(neg.output[0])
        if (
            hi is None
            or hi.op_type != "Slice"
            or cat is None
            or cat.op_type != "Concat"
            or list(cat.input[:1]) != [neg.output[0]]
        ):
            return None
        x = hi.input[0]
        lo = self.producer.get(cat.input[1]) if len(cat.input) == 2 else None
        shape = self.shapes.get(x)
        if (
            lo is None
            or lo.op_type != "Slice"
            or lo.input[0] != x
            or shape is None
            or len(shape) != 4
            or min(shape) < 1
        ):
            return None
        width, half = shape[3], shape[3] // 2
        axis = next((a.i for a in cat.attribute if a.name == "axis"), 0)
        if (
            axis not in (-1, 3)
            or width % 2
            or self._slice_range(hi, width) != (half, width)
            or self._slice_range(lo, width) != (0, half)
        ):
            return None
        sin_mul = self.only_consumer(cat.output[0])
        if sin_mul is None or sin_mul.op_type != "Mul":
            return None
        add = self.only_consumer(sin_mul.output[0])
        if add is None or add.op_type != "Add":
            return None
        cos_mul = self.producer.get(add.input[0] if add.input[1] == sin_mul.output[0] else add.input[1])
        if (
            cos_mul is None
            or cos_mul.op_type != "Mul"
            or x not in cos_mul.input
            or self.only_consumer(cos_mul.output[0]) is not add
        ):
            return None
        sin = self.const(sin_mul.input[1] if sin_mul.input[0] == cat.output[0] else sin_mul.input[0])
        cos = self.const(cos_mul.input[1] if cos_mul.input[0] == x else cos_mul.input[0])
        if (
            cos is None
            or sin is None
            or cos.shape != sin.shape
            or cos.ndim != 4
            or cos.shape[0] != 1
            or cos.shape[3] != width
        ):
            return None
        if cos.shape[1] == 1 and cos.shape[2] == shape[2]:
            seq_axis = 2
        elif cos.shape[2] == 1 and cos.shape[1] == shape[1]:
            seq_axis = 1
        else:
            return None
        cos, sin = cos.reshape(-1, width), sin.reshape(-1, width)
        if not (
            np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])
        ):
            return None  # not the rotate-half form with duplicated frequencies
        nodes = [n for n in (hi, lo) if all(u in (neg, cat) for u in self.consumers[n.output[0]])]
        return (
            x,
            seq_axis,
            cos[:, :half].astype(np.float32),
            sin[:, :half].astype(np.float32),
            [*nodes, neg, cat, sin_mul, cos_mul, add],
        )

    def _slice_range(self, node: onnx.NodeProto, width: int) -> tuple[int, int] | None:
        """(start, end) of a last-axis, unit-step Slice with constant bounds, clamped to ``width``."""
        bounds = [self.const(name) if name else None for name in node.input[1:]]
        values = [int(b.ravel()[0]) for b in bounds if b is not None and b.size == 1]
        if len(values) != len(bounds) or len(values) < 3:
            return None
        start, end, axis = values[:3]
        if values[3:4] not in ([], [1]) or axis not in (-1, 3):
            return None
        start, end = (v + width if v < 0 else v for v in (start, end))
        return max(0, min(start, width)), max(0, min(end, width))

    def _rms_chain(
        self, mean: onnx.NodeProto
    ) -> tuple[str, float, int, list[onnx.NodeProto], str | None, str] | None:
        pow_ = self.producer.get(mean.input[0])
        if pow_ is None or pow_.op_type != "Pow" or self.only_consumer(pow_.output[0]) is not mean:
            return None
        exponent = self.const(pow_.input[1])
        axes = self.const(mean.input[1]) if len(mean.input) > 1 else None
        keepdims = next((a.i for a in mean.attribute if a.name == "keepdims"), 1)
        x = pow_.input[0]
        shape = self.shapes.get(x)
        if (
            shape is None
            or shape[-1] < 0
            or exponent is None
            or float(exponent) != 2.0
            or axes is None
            or not keepdims
        ):
            return None
        rank, width = len(shape), shape[-1]
        if list(axes.ravel()) not in ([-1], [rank - 1]):
            return None
        add = self.only_consumer(mean.output[0])
        if add is None or add.op_type != "Add":
            return None
        eps = self.const(add.input[1] if add.input[0] == mean.output[0] else add.input[0])
        sqrt = self.only_consumer(add.output[0])
        recip = self.only_consumer(sqrt.output[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
        mul = self.only_consumer(recip.output[0]) if recip is not None and recip.op_type == "Reciprocal" else None
        if eps is None or eps.size != 1 or mul is None or mul.op_type != "Mul" or x not in mul.input:
            return None
        nodes = [pow_, mean, add, sqrt, recip, mul]
        out, weight = mul.output[0], None
        scale_mul = self.only_consumer(out)
        if scale_mul is not None and scale_mul.op_type == "Mul":
            other = scale_mul.input[1] if scale_mul.input[0] == out else scale_mul.input[0]
            w = self.const(other)
            if w is not None and w.ndim == 1 and w.shape[0] == width and w.dtype == np.float32:
                nodes.append(scale_mul)
                out, weight = scale_mul.output[0], (other if other in self.inits else self._add_init(w, f"{other}_w"))
        return x, float(eps.ravel()[0]), width, nodes, weight, out

    def _ensure_domain(self, domain: str) -> None:
        if not any(op.domain == domain for op in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(domain, 1))


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Float32 tensor name -> its static shape (-1 where a dimension is not known), by shape inference on a
    weightless copy."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for init in light.graph.initializer:  # weights need only dims and type; small constants (axes, shapes) stay
        if int(np.prod(init.dims)) <= 4096:
            continue
        init.ClearField("raw_data")
        init.ClearField("float_data")
        init.ClearField("int32_data")
        del init.external_data[:]
        init.data_location = TensorProto.DEFAULT
    inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    shapes: dict[str, tuple[int, ...]] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        tt = value.type.tensor_type
        if tt.elem_type == TensorProto.FLOAT and tt.shape.dim:
            shapes[value.name] = tuple(
                int(d.dim_value) if d.HasField("dim_value") else -1 for d in tt.shape.dim
            )
    return shapes
