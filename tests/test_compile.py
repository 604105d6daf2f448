"""torch.compile: each quantized linear is one ``svdq::linear`` node, the model compiles as one graph.

CPU runs the reference path inside the op (the GPU runs the kernels: same op, ``bench/e2e.py --rows
svdq_compile``). The backend used here counts the op's nodes and hands the graph to ``aot_eager``, which runs the
op's fake implementation and functionalization as Inductor would, without needing a C++ compiler.
"""

import pytest
import torch
from svdq.comfy_runtime import import_comfy

import_comfy()

import comfy.ldm.flux.math  # noqa: E402
import comfy.ldm.modules.attention  # noqa: E402
import comfy.model_management  # noqa: E402
from helpers import random_layer  # noqa: E402
from svdq.demo import relative_error  # noqa: E402
from svdq.kernels import torch_op  # noqa: E402
from svdq.nodes.loading import load_svdq_model  # noqa: E402
from svdq.nodes.lora import apply_lora  # noqa: E402
from test_lora import make_lora  # noqa: E402


def _op_args(w, x, lora=None, gelu=False):
    tensors = [getattr(w, f) for f in torch_op.FIELDS]
    down, up = lora if lora is not None else (None, None)
    return (x, tensors, down, up, w.kind, w.precision, w.act_precision, w.act_unsigned, w.act_shift,
            w.in_features, w.out_features, gelu)


@pytest.mark.parametrize("with_lora,gelu", [(False, False), (True, False), (True, True)])
def test_op_passes_torch_library_checks(with_lora, gelu):
    """Schema, fake (meta) implementation against the real one, and dispatch under AOT: what torch.compile needs."""
    w = random_layer(96, 128, rank=16, seed=1)
    x = torch.randn(2, 5, 128, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    lora = (torch.randn(128, 4, generator=g) * 0.1, torch.randn(96, 4, generator=g) * 0.1) if with_lora else None
    torch.library.opcheck(torch.ops.svdq.linear.default, _op_args(w, x, lora, gelu))
    y = torch.ops.svdq.linear(*_op_args(w, x, lora, gelu))
    assert y.shape == (2, 5, 96) and y.dtype == torch.bfloat16
    if gelu:  # the epilogue GELU is the tanh GELU of the plain result (taken in fp32, before the 16-bit store)
        plain = torch.ops.svdq.linear(*_op_args(w, x, lora)).float()
        assert relative_error(y.float(), torch.nn.functional.gelu(plain, approximate="tanh")) < 1e-2


def test_op_rejects_a_wrong_input_width():
    w = random_layer(64, 128, rank=8)
    with pytest.raises(ValueError, match="expects 128"):  # eager
        torch.ops.svdq.linear(*_op_args(w, torch.randn(3, 64)))
    with pytest.raises(Exception, match="expects 128"):  # traced: the fake implementation checks (Dynamo wraps it)
        torch.compile(lambda x: torch.ops.svdq.linear(*_op_args(w, x)), backend="aot_eager")(torch.randn(3, 64))


class _CountingBackend:
    """A torch.compile backend that records how many graphs it got and their svdq::linear nodes."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, inputs):
        self.graphs.append(sum(1 for n in gm.graph.nodes if n.op == "call_function" and "svdq.linear" in str(n.target)))
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)


def _apply(dm, g=0):
    """One forward on the model's device (on a GPU machine: the kernels inside the op)."""
    dev = comfy.model_management.get_torch_device()
    gen = torch.Generator().manual_seed(g)
    x, ctx, y = (torch.randn(*s, generator=gen).to(dev) for s in ((1, 16, 16, 16), (1, 12, 128), (1, 64)))
    with torch.no_grad():
        return dm(x, torch.tensor([0.7], device=dev), ctx, y, guidance=torch.tensor([3.5], device=dev)).float().cpu()


@pytest.fixture
def pytorch_attention(monkeypatch):
    # on CPU ComfyUI picks the sub-quadratic attention, which asks psutil for free memory (a graph break in
    # ComfyUI's own code); the GPU default, PyTorch SDPA, traces
    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)


def test_whole_flux_compiles_as_one_graph_with_lora_and_follows_strength_changes(tiny_models, pytorch_attention):
    torch._dynamo.reset()
    qm = load_svdq_model(tiny_models[1])
    lora = make_lora()
    ml = apply_lora(qm, lora, 0.8)
    comfy.model_management.load_models_gpu([ml])
    dm = ml.model.diffusion_model
    quantized = [m for m in dm.modules() if getattr(m, "svdq_meta", None) is not None]
    backend = _CountingBackend()
    compiled = torch.compile(dm, backend=backend, fullgraph=True)
    eager = _apply(dm)
    qkv = dm.double_blocks[0].img_attn.qkv
    qkv.__dict__.pop("_svdq_cache")
    got = _apply(compiled)
    assert backend.graphs == [len(quantized)], backend.graphs  # one graph; every quantized linear is one op node
    assert relative_error(got, eager) < 1e-5  # aot_eager keeps eager numerics: the op path changes nothing
    cached = qkv.__dict__["_svdq_cache"][0][1]  # made by the compiled call: the op ran the module's own path
    assert torch.equal(_apply(compiled), got)
    # the op ran the module's own eager path: its cached weights object (plans, 1/λ) survives across calls
    assert qkv.__dict__["_svdq_cache"][0][1] is cached

    # a strength change installs new LoRA factors: the compiled model follows without requantizing anything
    ml2 = apply_lora(qm, lora, 0.3)
    comfy.model_management.load_models_gpu([ml2])
    dm2 = ml2.model.diffusion_model
    assert relative_error(_apply(dm2), eager) > 1e-3  # the strength matters
    assert relative_error(_apply(torch.compile(dm2, backend=backend, fullgraph=True)), _apply(dm2)) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend,mode,tol", [("cudagraphs", None, 1e-5), ("inductor", "reduce-overhead", 5e-2)])
def test_whole_model_under_cuda_graphs_from_a_cold_start(tiny_models, pytorch_attention, backend, mode, tol):
    """ComfyUI's TorchCompileModel node with backend "cudagraphs", and Inductor's reduce-overhead mode: a graph is
    warmed up with the calling thread's allocations routed into its private pool, so the state a layer makes on
    its first call (arena buffers, 1/λ, the LoRA-merged branch) must be made outside that pool, or recording
    fails ("tensors in the cudagraph pool not tracked as outputs"). Warm-up, recording and replays all match."""
    from svdq.kernels import dispatch

    torch._dynamo.reset()
    ml = apply_lora(load_svdq_model(tiny_models[1]), make_lora(), 0.8)
    comfy.model_management.load_models_gpu([ml])
    dm = ml.model.diffusion_model
    eager = _apply(dm)
    for m in dm.modules():  # a cold start: no per-layer device state and no arena buffers yet
        if hasattr(m, "forget_device_state"):
            m.forget_device_state()
    dispatch._arenas.clear()
    compiled = torch.compile(dm, backend=backend, mode=mode)
    outs = [_apply(compiled) for _ in range(4)]  # warm-up, recording, replays
    for got in outs:
        assert relative_error(got, eager) < tol
    assert torch.equal(outs[-1], outs[-2])


def test_composite_single_blocks_compile(tmp_path_factory, pytorch_attention):
    """Nunchaku files split FLUX single blocks into parts: traced as one op per part, concatenated or summed."""
    import nunchaku_gen as gen
    from safetensors.torch import load_file
    from svdq.demo import make_float_model_file
    from svdq.synthetic import TINY_FLUX

    torch._dynamo.reset()
    d = tmp_path_factory.mktemp("compile-nunchaku")
    f = make_float_model_file(d / "tiny-flux-bf16.safetensors")
    gen.flux_nunchaku_file(load_file(str(f)), TINY_FLUX, d / "svdq-int4_r16-tiny.safetensors", d / "ours.safetensors")
    m = load_svdq_model(d / "svdq-int4_r16-tiny.safetensors")
    comfy.model_management.load_models_gpu([m])
    dm = m.model.diffusion_model
    lin1 = dm.single_blocks[0].linear1
    assert len(lin1.svdq_parts) == 2
    backend = _CountingBackend()
    got = _apply(torch.compile(dm, backend=backend, fullgraph=True))
    parts = sum(len(mod.svdq_parts) for mod in dm.modules() if getattr(mod, "svdq_meta", None) is not None)
    assert backend.graphs == [parts]
    assert relative_error(got, _apply(dm)) < 1e-5


def test_kernel_path_keeps_the_layer_object_on_the_qweight_and_follows_lora_changes(tiny_models, triton_kernels):
    """On the kernel path the op remembers the layer's weights object on the qweight it was given (the compiled
    step at batch 1 is host-bound); a new LoRA set on the layer, or unpatching, must not reuse it."""
    qm = load_svdq_model(tiny_models[1])
    comfy.model_management.load_models_gpu([qm])
    lin = qm.model.diffusion_model.double_blocks[0].img_attn.qkv
    dev = lin.svdq_qweight.device
    tensors = [getattr(lin, f"svdq_{f}", None) for f in torch_op.FIELDS]
    x = torch.randn(5, lin.in_features, generator=torch.Generator().manual_seed(0)).to(dev)

    def op():
        return torch_op.call(x, tensors, lin.svdq_parts[0][1], lin.in_features, lin.out_features)

    base = op()
    assert torch.allclose(base, lin(x), atol=1e-6)
    fast = getattr(lin.svdq_qweight, torch_op.STATE)
    assert fast[3] is lin.quantized_weights(device=dev)  # the module's own cached object (its plans live there)
    assert torch.equal(op(), base) and getattr(lin.svdq_qweight, torch_op.STATE) is fast
    g = torch.Generator().manual_seed(1)
    lin.svdq_lora = [(torch.randn(lin.in_features, 4, generator=g).to(dev), torch.randn(lin.out_features, 4, generator=g).to(dev))]
    with_lora = op()
    assert getattr(lin.svdq_qweight, torch_op.STATE) is not fast
    assert torch.allclose(with_lora, lin(x), atol=1e-6) and relative_error(with_lora, base) > 1e-2
    lin.forget_device_state()
    assert not hasattr(lin.svdq_qweight, torch_op.STATE)


def test_mlp_gelu_runs_in_the_first_layers_epilogue(tiny_models):
    """Loading moves Flux's MLP GELU (tanh) into the first MLP layer's GEMM epilogue; the model computes what it
    computed with the GELU module, and a LoRA bias delta (added before the GELU) takes the GELU out again."""
    qm = load_svdq_model(tiny_models[1])
    comfy.model_management.load_models_gpu([qm])
    dm = qm.model.diffusion_model
    seqs = [s for b in dm.double_blocks for s in (b.img_mlp, b.txt_mlp)]
    assert all(isinstance(s[1], torch.nn.Identity) and s[0].svdq_gelu for s in seqs)
    fused = _apply(dm)
    for s in seqs:  # back to ComfyUI's own structure
        s[0].svdq_gelu = False
        s[1] = torch.nn.GELU(approximate="tanh")
    plain = _apply(dm)
    assert relative_error(fused, plain) < 1e-2  # fp32 GELU before the 16-bit store vs the GELU of the stored output

    lin = seqs[0][0]
    lin.svdq_gelu = True
    x = torch.randn(3, lin.in_features, dtype=torch.bfloat16, device=comfy.model_management.get_torch_device())
    lin.svdq_bias_delta = torch.randn(lin.out_features) * 0.1
    with torch.no_grad():
        with_delta = lin(x)
        lin.svdq_gelu = False
        expected = torch.nn.functional.gelu(lin(x), approximate="tanh")
    assert torch.equal(with_delta, expected)
    lin.svdq_bias_delta = None


def _sample(model, seed=3, cfg=1.0):
    """ComfyUI's KSampler for two steps: cfg 1 runs the model at batch 1, cfg > 1 on cond and uncond together."""
    from svdq.nodes.pipeline import random_conditioning, sample

    cond = random_conditioning(model, 1)[0]
    with torch.no_grad():
        return sample(model, cond, seed=seed, steps=2, size=16, cfg=cfg).float()


def test_compile_node_per_block_through_comfy_sampler(tiny_models, pytorch_attention):
    """The SVDQ Compile Model node's per-block scope: every block of the Flux model is its own compiled module,
    swapped in by ComfyUI's compile wrapper while the sampler runs, with the eager results (``aot_eager``)."""
    from svdq.nodes.compile import block_keys, compile_model
    from svdq.nodes.comfy_nodes import SVDQCompileModel

    torch._dynamo.reset()
    qm = load_svdq_model(tiny_models[1])
    dm = qm.model.diffusion_model
    keys = block_keys(dm)
    assert len(keys) == len(dm.double_blocks) + len(dm.single_blocks) > 0
    eager = _sample(qm)
    compiled = compile_model(qm, "default", "per block", backend="aot_eager")
    assert compiled is not qm and "torch_compile_kwargs" not in qm.model_options  # the input model is untouched
    assert compiled.model_options["torch_compile_kwargs"]["mode"] is None
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    got = _sample(compiled)
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames  # Dynamo did compile the blocks
    assert relative_error(got, eager) < 1e-5
    # the first-block cache on top of per-block compile: its decisions stay in Python, the blocks compiled
    from svdq.nodes.first_block_cache import apply_first_block_cache

    with_cache = apply_first_block_cache(qm, 1.0)  # a threshold every step's change passes: steps are skipped
    want = _sample(with_cache)
    fbc = apply_first_block_cache(compiled, 1.0)
    assert relative_error(_sample(fbc), want) < 1e-5
    assert fbc.svdq_first_block_cache.skipped_steps == with_cache.svdq_first_block_cache.skipped_steps > 0
    # the node itself (Inductor) only wraps: nothing compiles until a sampler runs
    out = SVDQCompileModel.execute(model=qm, mode="default", scope="whole model").result[0]
    assert out.model_options["torch_compile_kwargs"]["backend"] == "inductor"


def test_per_block_keys_leave_out_lists_their_callers_iterate():
    """A UNet's input/output blocks are lists of ``nn.Sequential`` whose layers ComfyUI iterates and dispatches on by
    class: compiled wrappers there would break it, so only lists of directly called blocks are compiled per block."""
    from svdq.nodes.compile import block_keys

    class UNetLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.input_blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(2, 2)) for _ in range(2)])
            self.middle_block = torch.nn.Sequential(torch.nn.Linear(2, 2))
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])

    assert block_keys(UNetLike()) == [f"diffusion_model.blocks.{i}" for i in range(3)]
    assert block_keys(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []


def test_compile_node_checks_its_options_and_needs_cuda_for_cuda_graphs(tiny_models, caplog):
    from svdq.nodes.compile import compile_model

    qm = load_svdq_model(tiny_models[1])
    with pytest.raises(ValueError, match="mode must be one of"):
        compile_model(qm, "fast", "per block")
    with pytest.raises(ValueError, match="scope must be one of"):
        compile_model(qm, "default", "layers")
    if torch.device(qm.load_device).type != "cuda":
        with caplog.at_level("WARNING", logger="svdq"):
            m = compile_model(qm, "reduce-overhead", "whole model", backend="aot_eager")
        assert "needs a CUDA device" in caplog.text
        assert m.model_options["torch_compile_kwargs"]["mode"] is None
    else:  # CUDA graphs take the whole model, whatever scope was asked for
        m = compile_model(qm, "reduce-overhead", "per block")
        assert m.model_options["torch_compile_kwargs"]["mode"] == "reduce-overhead"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_compile_node_cuda_graphs_through_comfy_sampler(tiny_models):
    """reduce-overhead through ComfyUI's sampler from a cold start, several sampler runs, batch 1 and 2: the results of
    the same Inductor code without CUDA graphs (Inductor's own fusions round differently from eager, and 4-bit codes
    flip on such differences, so against eager the tolerance is loose)."""
    from svdq.kernels import dispatch
    from svdq.nodes.compile import compile_model

    torch._dynamo.reset()
    qm = apply_lora(load_svdq_model(tiny_models[1]), make_lora(), 0.8)
    eager = _sample(qm)
    plain = compile_model(qm, "default", "whole model")
    ref, ref2 = _sample(plain), _sample(plain, cfg=2.0)
    for m in qm.model.diffusion_model.modules():
        if hasattr(m, "forget_device_state"):
            m.forget_device_state()
    dispatch._arenas.clear()
    compiled = compile_model(qm, "reduce-overhead", "per block")
    outs = [_sample(compiled) for _ in range(3)]
    for got in outs:
        assert relative_error(got, ref) < 1e-3, relative_error(got, ref)
    assert relative_error(outs[-1], eager) < 0.2
    assert torch.equal(outs[-1], outs[-2])
    assert relative_error(_sample(compiled, seed=4), outs[-1]) > 1e-3  # another seed is another image, not a replay
    assert relative_error(_sample(compiled, cfg=2.0), ref2) < 1e-3  # batch 2: cond + uncond in one call
