"""FLOP accounting: the peak table, GPU-name matching, FLOPs per token, MFU and HFU."""

from __future__ import annotations

import pytest
import torch

from job.plan import flops

MISTRAL_7B = 7_248_023_552
MISTRAL_EMBEDDING = 32768 * 4096


@pytest.mark.parametrize(
    ("name", "tera"),
    [
        ("NVIDIA RTX PRO 6000 Blackwell Server Edition", 503.8),
        ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", 503.8),
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.05),
    ],
)
def test_peak_by_cuda_device_name(name: str, tera: float) -> None:
    assert flops.peak_bf16_flops(name) == pytest.approx(tera * 1e12)


def test_unknown_gpu_has_no_peak() -> None:
    assert flops.peak_bf16_flops("NVIDIA GeForce GTX 1080") is None
    assert flops.table_key("Some Accelerator") is None


def test_detect_gpu_is_none_without_cuda() -> None:
    if torch.cuda.is_available():
        info = flops.detect_gpu()
        assert info is not None and info.memory_bytes > 0
    else:
        assert flops.detect_gpu() is None


def test_flops_per_token_mistral_7b() -> None:
    shape = flops.FlopShape(num_layers=32, attention_width=32 * 128)
    model = flops.flops_per_token(shape, MISTRAL_7B, 2048, embedding_params=MISTRAL_EMBEDDING)
    hardware = flops.flops_per_token(shape, MISTRAL_7B, 2048, embedding_params=MISTRAL_EMBEDDING, recompute=True)
    matmul_params = MISTRAL_7B - MISTRAL_EMBEDDING
    attention = 32 * 4096 * 2048
    assert model == 6 * matmul_params + 12 * attention
    assert hardware == 8 * matmul_params + 16 * attention
    assert hardware / model == pytest.approx(4 / 3)
    assert 45e9 < model < 46e9  # ~45.9 GFLOP per token


def test_flop_shape_from_config() -> None:
    from transformers import MistralConfig

    config = MistralConfig(hidden_size=256, num_attention_heads=4, num_hidden_layers=3, head_dim=96)
    assert flops.flop_shape(config) == flops.FlopShape(num_layers=3, attention_width=4 * 96)
    config = MistralConfig(hidden_size=256, num_attention_heads=4, num_hidden_layers=2, head_dim=None)
    assert flops.flop_shape(config) == flops.FlopShape(num_layers=2, attention_width=256)


def test_mfu_and_hfu() -> None:
    peak = flops.PEAK_BF16_FLOPS["RTX PRO 6000 Blackwell"]
    assert flops.mfu(4000.0, 45.9e9, peak) == pytest.approx(4000 * 45.9e9 / 503.8e12)
    assert flops.hfu(4000.0, 61.2e9, peak) == pytest.approx(4000 * 61.2e9 / 503.8e12)


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        flops.flops_per_token(flops.FlopShape(1, 1), 0, 10)


def test_a_capped_process_plans_for_its_cap_not_the_whole_card(monkeypatch) -> None:
    # No GPU here: CUDA's two answers are faked (an H200 capped at the 96 GB card's 97,887 MiB).
    import torch

    from job.plan.flops import usable_memory_bytes

    total = 143_771 * 2**20
    props = type("Props", (), {"total_memory": total, "name": "NVIDIA H200"})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=0: props)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=0: 97_887 / 143_771)
    assert abs(usable_memory_bytes(0) - 97_887 * 2**20) <= 1
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=0: 1.0)
    assert usable_memory_bytes(0) == total
