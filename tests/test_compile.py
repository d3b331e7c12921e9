"""job/train/compile.py and job/train/liger.py: compiled decoder layers, the compile cache in the run's store,
Liger's kernels on a model instance.

In-process tests compile with dynamo's `aot_eager` backend (dynamo, AOTAutograd and its checkpoint-aware
partitioner, without inductor's C++ build, which takes ~30 s per graph on 2 cores); the one slow test runs
the job with inductor twice, the second start restoring the first one's cache from the store.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, TrainerState

from conftest import cpu_run_args, run_job
from job.config.load import build_config
from job.errors import ConfigError, LeaseLost, TrainingFailed
from job.model.tiny import TINY_CONFIG
from job.storage.local import LocalStore
from job.train import compile as regional
from job.train.compile import CompileCache, CompileCallback, CompileStats, cache_key, compile_layers, key_inputs
from job.train.fastpath import DeviceInfo, FastPathInputs, decide
from job.train.liger import KERNELS, apply_liger_kernels

FAST = "aot_eager"


def tiny(layers: int = 3, seed: int = 0) -> torch.nn.Module:
    config = MistralConfig(vocab_size=512, **{**TINY_CONFIG, "num_hidden_layers": layers})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def checkpoint_layers(model: torch.nn.Module, recomputed: set[int]) -> None:
    """Non-reentrant activation checkpointing on the `recomputed` layers only (what the fast path sets)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for index, layer in enumerate(regional.decoder_layers(model)):
        layer.gradient_checkpointing = index in recomputed


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # TRL passes use_cache=False
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from nothing, and leaves dynamo's settings as it found them."""
    import torch._dynamo
    import torch._functorch.config

    limit = torch._dynamo.config.recompile_limit
    lowering = torch._functorch.config.force_non_lazy_backward_lowering
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = limit
    torch._functorch.config.force_non_lazy_backward_lowering = lowering


# ---------------------------------------------------------------- compiled layers


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_compiled_layers_match_eager_with_some_layers_checkpointed(autocast: bool) -> None:
    eager = tiny()
    compiled = copy.deepcopy(eager)
    for model in (eager, compiled):
        checkpoint_layers(model, recomputed={0, 2})
        model.train()
    layers = compile_layers(compiled, forced=True, backend=FAST)
    assert layers is not None and len(layers.layers) == 3
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        before = CompileStats.now()
        loss, grads = loss_and_grads(compiled, ids)
        graphs = CompileStats.now().since(before).graphs
        reference, reference_grads = loss_and_grads(eager, ids)
    tolerance = {"rtol": 2e-2, "atol": 2e-3} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(loss, reference, **tolerance)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, **tolerance, msg=name)
    assert graphs == 2, "one graph for the checkpointed layers, one for the others"
    assert layers.failure is None
    assert list(compiled.state_dict()) == list(eager.state_dict()), "checkpoints and final/ keep their names"


def test_identical_layers_share_one_graph_and_a_new_length_recompiles_once() -> None:
    model = tiny(layers=4)
    model.train()
    callback = CompileCallback(compile_layers(model, forced=True, backend=FAST), cache=None)
    callback.on_train_begin(None, TrainerState(), None)
    graphs = []
    with capture_logs() as logs:
        for step, length in enumerate((16, 24, 20), start=1):  # padded batches: a new longest row each step
            before = CompileStats.now()
            callback.on_step_begin(None, TrainerState(global_step=step - 1), None)
            loss_and_grads(model, torch.randint(0, 512, (2, length)))
            callback.on_step_end(None, TrainerState(global_step=step), None)
            graphs.append(CompileStats.now().since(before).graphs)
    assert graphs == [1, 1, 0], "4 layers, one graph; the second length makes it dynamic, then no recompile"
    (finished,) = events(logs, "compile_finished")
    assert finished["step"] == 1 and finished["graphs"] == 1 and finished["compile_seconds"] > 0
    assert [(e["step"], e["new_graphs"]) for e in events(logs, "compile_recompiled")] == [(2, 1)]
    (overhead,) = events(logs, "compile_step_overhead")
    assert overhead["step"] == 3, "measured against the first step that compiled nothing"


def failing_backend(graph: torch.fx.GraphModule, example_inputs: list) -> None:
    raise RuntimeError("the compiler broke")


def test_an_auto_compile_that_fails_falls_back_to_eager_with_a_warning() -> None:
    model = tiny(layers=2)
    reference = copy.deepcopy(model)
    layers = compile_layers(model, forced=False, backend=failing_backend)
    ids = torch.randint(0, 512, (2, 12))
    with capture_logs() as logs:
        loss, _ = loss_and_grads(model, ids)
    torch.testing.assert_close(loss, loss_and_grads(reference, ids)[0], rtol=0, atol=0)
    assert layers.failure and "the compiler broke" in layers.failure
    assert all(layer._compiled_call_impl is None for layer in layers.layers)
    warnings = [entry for entry in logs if entry["event"] == "compile_failed_running_eager"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"


def test_a_forced_compile_that_fails_stops_the_run_with_a_clear_error() -> None:
    model = tiny(layers=2)
    compile_layers(model, forced=True, backend=failing_backend)
    with pytest.raises(TrainingFailed) as caught:
        loss_and_grads(model, torch.randint(0, 512, (2, 12)))
    assert caught.value.exit_code == 70
    assert "model.compile is true" in caught.value.message and "the compiler broke" in caught.value.message
    assert "model.compile: false" in caught.value.hint


# ---------------------------------------------------------------- the cache key


def job_config(**sections: dict):
    base = {"data": {"train": "x.jsonl", "max_length": 2048}, "model": {"source": "/models/a"}, "train": {}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return build_config(base)


H200 = DeviceInfo("cuda", name="NVIDIA H200", capability=(9, 0), memory_bytes=150 * 2**30, cuda="13.0", torch="2.13.0")
VERSIONS = {"torch": "2.13.0", "transformers": "5.24.0", "triton": "3.6.0"}


def test_cache_key_changes_with_what_changes_the_code_and_nothing_else() -> None:
    fast = decide(FastPathInputs(device=H200))
    model_config = tiny(layers=2).config

    def key(config=None, fast_path=fast, architecture=model_config, versions=VERSIONS, backend="inductor") -> str:
        inputs = key_inputs(config or job_config(), fast_path, architecture, backend=backend, versions=versions)
        return cache_key(inputs)

    base = key()
    changed = {
        "dtype": key(job_config(model={"dtype": "float16"})),
        "max_length": key(job_config(data={"max_length": 4096})),
        "batch": key(job_config(train={"per_device_train_batch_size": 4})),
        "packing": key(job_config(data={"packing": True})),
        "optimizer": key(job_config(train={"optim": "adamw_torch_fused"})),
        "attention": key(fast_path=replace(fast, attn_implementation="eager")),
        "checkpointing": key(fast_path=replace(fast, activation_checkpointing=not fast.activation_checkpointing)),
        "card": key(fast_path=replace(fast, device=replace(H200, name="NVIDIA RTX PRO 6000", capability=(12, 0)))),
        "cuda": key(fast_path=replace(fast, device=replace(H200, cuda="12.8"))),
        "architecture": key(architecture=tiny(layers=3).config),
        "torch": key(versions={**VERSIONS, "torch": "2.14.0"}),
        "triton": key(versions={**VERSIONS, "triton": "3.7.0"}),
        "backend": key(backend="aot_eager"),
    }
    assert all(value != base for value in changed.values()), [k for k, v in changed.items() if v == base]
    assert len(set(changed.values())) == len(changed)
    renamed = copy.deepcopy(model_config)
    renamed._name_or_path = "/scratch/elsewhere/model"
    unchanged = {
        "run": key(job_config(run={"name": "other", "output": "s3://b/runs"})),
        "hyperparameters": key(job_config(train={"learning_rate": 1e-4, "max_steps": 7, "seed": 3})),
        "model path": key(job_config(model={"source": "/other/path"}), architecture=renamed),
        "card memory": key(fast_path=replace(fast, device=replace(H200, memory_bytes=96 * 2**30))),
        "reasons": key(fast_path=replace(fast, reasons={"compile": "anything"})),
        "accumulation": key(fast_path=replace(fast, grad_accum=fast.grad_accum * 2)),
    }
    assert all(value == base for value in unchanged.values()), [k for k, v in unchanged.items() if v != base]
    kept = replace(fast, activation_checkpointing=True, kept_layers=frozenset({31, 30, 29}))
    inputs = key_inputs(job_config(), kept, model_config, versions=VERSIONS)
    assert json.loads(json.dumps(inputs))["fast_path"]["kept_layers"] == [29, 30, 31], "plain, order-stable data"


# ---------------------------------------------------------------- the cache in the store


@pytest.fixture(scope="module")
def artifacts() -> bytes:
    """A real mega-cache: inductor compiles a small function (one C++ kernel, scalar code: seconds)."""
    import torch._inductor.config as inductor

    torch._dynamo.reset()
    with inductor.patch({"cpp.vec_isa_ok": False}):
        torch.compile(lambda x: (x.sin() + 1) * 2)(torch.randn(8))
    saved = torch.compiler.save_cache_artifacts()
    assert saved is not None
    return saved[0]


def events(logs: list[dict], name: str) -> list[dict]:
    return [entry for entry in logs if entry["event"] == name]


def test_cache_round_trip_through_a_local_store(tmp_path: Path, artifacts: bytes) -> None:
    store = LocalStore(tmp_path / "run")
    fenced = []
    writer = CompileCache(store, "k1", fence=lambda: fenced.append(1), inputs={"torch": "2.13.0"})
    with capture_logs() as logs:
        assert writer.save()
        assert not writer.save(), "nothing compiled since the last save: not written again"
    assert fenced == [1], "the lease is checked before the write"
    written = store.read_bytes("cache/compile/k1.bin")
    assert len(written) == writer.saved_bytes >= len(artifacts), "everything compiled in this process so far"
    assert json.loads(store.read_bytes("cache/compile/k1.json")) == {"torch": "2.13.0"}
    assert events(logs, "compile_cache_saved")[0]["bytes"] == len(written)
    reader = CompileCache(store, "k1", writer=False)
    with capture_logs() as logs:
        assert reader.restore() and reader.restored
    (restored,) = events(logs, "compile_cache_restored")
    assert restored["artifacts"]["inductor"] >= 1 and restored["bytes"] == len(written)
    assert not reader.save(), "only rank 0 writes"


def test_absent_oversize_and_corrupt_caches_are_one_warning_each(tmp_path: Path, artifacts: bytes) -> None:
    store = LocalStore(tmp_path / "run")
    with capture_logs() as logs:
        assert not CompileCache(store, "none").restore()
    assert events(logs, "compile_cache_absent")
    store.write_bytes("cache/compile/big.bin", artifacts)
    with capture_logs() as logs:
        assert not CompileCache(store, "big", max_bytes=len(artifacts) - 1).restore()
    assert events(logs, "compile_cache_refused")[0]["log_level"] == "warning"
    store.write_bytes("cache/compile/bad.bin", artifacts[:-40] + b"\0" * 40)
    with capture_logs() as logs:
        assert not CompileCache(store, "bad").restore()
    assert events(logs, "compile_cache_unreadable")[0]["log_level"] == "warning"


def test_a_cache_that_cannot_be_written_is_a_warning(tmp_path: Path, artifacts: bytes) -> None:
    store = LocalStore(tmp_path / "run")

    def lost() -> None:
        raise LeaseLost("another process holds the lease")

    with capture_logs() as logs:
        assert not CompileCache(store, "k", fence=lost).save()
    assert not store.exists("cache/compile/k.bin"), "no write after the lease is lost"
    assert "lease" in events(logs, "compile_cache_not_saved")[0]["error"]
    (tmp_path / "file").write_text("not a directory")
    with capture_logs() as logs:
        assert not CompileCache(LocalStore(tmp_path / "file"), "k").save()
    assert events(logs, "compile_cache_not_saved")[0]["log_level"] == "warning"


def test_inductor_cache_goes_to_scratch_unless_set(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert regional.use_scratch_for_inductor(tmp_path) == str(tmp_path / "cache" / "torchinductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/image/cache")
    assert regional.use_scratch_for_inductor(tmp_path) == "/image/cache"


# ---------------------------------------------------------------- Liger (its Triton kernels cannot run here)


def liger_signature_recorder(calls: list[dict]):
    """Stands in for liger_kernel's `apply_liger_kernel_to_mistral/llama` (same signature, same defaults)."""

    def apply(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True, swiglu=True, model=None):
        calls.append(dict(rope=rope, cross_entropy=cross_entropy, fused_linear_cross_entropy=fused_linear_cross_entropy,
                          rms_norm=rms_norm, swiglu=swiglu, model=model))  # fmt: skip

    return apply


@pytest.mark.parametrize("config_class", [MistralConfig, LlamaConfig])
def test_liger_gets_the_layer_kernels_and_never_the_loss_kernels(config_class) -> None:
    model = AutoModelForCausalLM.from_config(config_class(vocab_size=64, **{**TINY_CONFIG, "num_hidden_layers": 1}))
    calls: list[dict] = []
    appliers = {"mistral": liger_signature_recorder(calls), "llama": liger_signature_recorder(calls)}
    with capture_logs() as logs:
        switches = apply_liger_kernels(model, appliers)
    (call,) = calls
    assert call["model"] is model, "applied to the loaded instance (its existing layers patched)"
    assert call["rope"] and call["rms_norm"] and call["swiglu"]
    assert not call["cross_entropy"] and not call["fused_linear_cross_entropy"], "TRL's chunked head keeps the loss"
    assert switches == KERNELS
    assert events(logs, "liger_kernels")[0]["applied"] == ["rope", "rms_norm", "swiglu"]


def test_liger_refuses_an_architecture_it_has_no_kernels_for() -> None:
    model = tiny(layers=1)
    with pytest.raises(ConfigError, match="no kernels for model type 'mistral'"):
        apply_liger_kernels(model, {"llama": liger_signature_recorder([])})


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")
def test_liger_without_the_package_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="liger") as caught:
        apply_liger_kernels(tiny(layers=1))
    assert caught.value.exit_code == 64 and "liger" in caught.value.hint


# ---------------------------------------------------------------- the job: compile, save, restart, restore


@pytest.mark.slow
def test_a_second_start_restores_the_compile_cache_from_the_store(tmp_path: Path, tiny_model_dir: Path) -> None:
    compiled = ("--set", "model.compile=true", "--set", "train.max_steps=1", "--set", "data.eval=")
    fast_cpp = {"TORCHINDUCTOR_VEC_ISA_OK": "0"}  # scalar C++: half the build time, same inductor path
    first = run_job(
        *cpu_run_args(tmp_path, tiny_model_dir, "first"),
        *compiled,
        env={**fast_cpp, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-1")},
    )
    assert first.returncode == 0, first.stderr[-4000:]
    (finished,) = first.events("compile_finished")
    assert finished["graphs"] >= 1 and finished["cache_misses"] >= 1 and not finished["cache_restored"]
    (saved,) = first.events("compile_cache_saved")
    store = tmp_path / "outputs"
    key = saved["key"]
    assert (store / "first" / "cache" / "compile" / f"{key}.bin").stat().st_size == saved["bytes"]

    # Another run of the same recipe on another machine, reading the first one's object from its store. Its local
    # inductor cache holds only built C++ kernels (on a GPU the object itself carries the built Triton kernels;
    # on CPU gcc would rebuild them from the object's source, ~20 s here): no graph or AOTAutograd entry.
    (store / "second" / "cache" / "compile").mkdir(parents=True)
    for suffix in (".bin", ".json"):
        name = f"{key}{suffix}"
        (store / "second" / "cache" / "compile" / name).write_bytes(
            (store / "first" / "cache" / "compile" / name).read_bytes()
        )
    kernels = tmp_path / "inductor-2"
    shutil.copytree(tmp_path / "inductor-1", kernels, ignore=shutil.ignore_patterns("fxgraph", "aotautograd", "locks"))
    second = run_job(
        *cpu_run_args(tmp_path, tiny_model_dir, "second"),
        *compiled,
        env={**fast_cpp, "TORCHINDUCTOR_CACHE_DIR": str(kernels)},
    )
    assert second.returncode == 0, second.stderr[-4000:]
    assert second.events("compile_cache_restored")[0]["key"] == key
    (again,) = second.events("compile_finished")
    assert again["cache_restored"] and again["cache_hits"] >= 1 and again["cache_misses"] == 0, again
    assert again["compile_seconds"] < finished["compile_seconds"] / 2, "the restart did not compile again"
    print(f"first start: {finished}\nrestored start: {again}")
    # Inductor's kernels against eager at the job level: the first step's loss (before any update).
    losses = [json.loads((store / name / "final" / "metrics.json").read_text())["loss_per_step"][0][1]
              for name in ("first", "second")]  # fmt: skip
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
