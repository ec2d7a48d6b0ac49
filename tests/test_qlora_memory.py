"""A 4-bit load holds the 4-bit model, not its full-precision source (peftkit.quant.load).

A ~250 MB Llama-shaped checkpoint (float32, 62M parameters, 45M of them in Linear layers) is
written to tmp once; a fresh interpreter loads it in 4 bits (float32, the trainer's default
dtype) and reports its anonymous and file-backed memory before and after, and its peak
(the kernel's high-water mark), so this process's own memory cannot blur the numbers. The same
interpreter then quantises an in-memory ``from_pretrained`` copy with ``quantize_model`` and
compares: every buffer bit for bit, the logits exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from peftkit.quant.load import NotStreamable, SafetensorsReader, checkpoint_files, load_quantized

MB = 2**20


def _llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=8192,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config())
    folder = tmp_path_factory.mktemp("llama_fp32")
    model.save_pretrained(folder)
    del model
    return folder


_PROBE = r"""
import ctypes, gc, json, re, sys, torch
torch.set_num_threads(2)
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from peftkit.quant import quantize_model, quantize_4bit
from peftkit.quant.load import load_quantized

def status():
    text = open("/proc/self/status").read()
    return {k: int(re.search(rf"^{k}:\s+(\d+)", text, re.M).group(1)) * 1024
            for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}

# warm the runtime (imports, the Llama code, kernels) at toy size: the baseline then holds
# everything but the model
toy = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, vocab_size=128))
quantize_model(toy)
toy(torch.zeros(1, 4, dtype=torch.long))
quantize_4bit(torch.randn(4096, 1024))
del toy
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
before = status()
model, info = load_quantized(sys.argv[1], AutoModelForCausalLM, {"dtype": torch.float32})
after = status()
seen, model_bytes = set(), 0
for t in [*model.parameters(), *model.buffers()]:
    if t.data_ptr() not in seen:
        seen.add(t.data_ptr())
        model_bytes += t.numel() * t.element_size()

ref = quantize_model(AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32))
ours, theirs = model.state_dict(), ref.state_dict()
differ = sorted(k for k in set(ours) | set(theirs)
                if k not in ours or k not in theirs or ours[k].dtype != theirs[k].dtype
                or not torch.equal(ours[k], theirs[k]))
ids = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    same_logits = torch.equal(model(ids).logits, ref(ids).logits)
print(json.dumps({"before": before, "after": after, "model_bytes": model_bytes, "info": info,
                  "differ": differ[:10], "same_logits": same_logits,
                  "n_4bit": sum(type(m).__name__ == "Linear4bit" for m in model.modules())}))
"""


def test_4bit_load_holds_only_the_4bit_model_and_matches_quantize_model(checkpoint):
    (file,) = checkpoint_files(checkpoint)
    file_mb = file.stat().st_size / MB
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(checkpoint)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    before, after = r["before"], r["after"]
    model_mb = r["model_bytes"] / MB  # 4-bit layers + float32 embeddings, head and norms
    anon_mb = (after["RssAnon"] - before["RssAnon"]) / MB
    file_backed_mb = (after["RssFile"] - before["RssFile"]) / MB
    peak_mb = (after["VmHWM"] - before["VmRSS"]) / MB
    numbers = f"file {file_mb:.0f} MB, model {model_mb:.0f} MB, {r}"
    assert r["n_4bit"] == 4 * 7, numbers
    assert r["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    # what the model holds, and nothing of the source: owned memory ~ the model, no mapped file
    assert 0.8 * model_mb <= anon_mb <= 1.25 * model_mb + 40, numbers
    assert file_backed_mb < 20, numbers  # a mapped checkpoint would add ~file_mb here
    # never the whole full-precision model at once: the model + one tensor (the 32 MB
    # embedding is the largest) + quantisation temporaries; the float32 model is 248 MB
    assert peak_mb < model_mb + 100, numbers
    # the same model as quantising an in-memory copy, bit for bit
    assert r["differ"] == [], numbers
    assert r["same_logits"], numbers


def test_reader_gives_safetensors_tensors_exactly(checkpoint):
    from safetensors import safe_open

    (file,) = checkpoint_files(checkpoint)
    reader = SafetensorsReader(file)
    try:
        with safe_open(file, framework="pt") as ref:
            names = sorted(ref.keys())
            assert sorted(reader.entries) == names
            for name in names[:4] + names[-3:]:
                mine, theirs = reader.read(name), ref.get_tensor(name)
                assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)
    finally:
        reader.close()


def test_bf16_checkpoint_tied_head_and_new_classifier_head(tmp_path):
    """A bf16 checkpoint loaded as float32 gives quantize_model's model bit for bit; tied
    embeddings stay tied (the head is not quantised); a seq_cls head missing from a causal-LM
    checkpoint is initialised and reported."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from peftkit.quant import Linear4bit, quantize_model

    torch.manual_seed(0)
    small = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=512)
    source = AutoModelForCausalLM.from_config(
        _llama_config(**small, tie_word_embeddings=True, num_attention_heads=4)
    )
    source.to(torch.bfloat16).save_pretrained(tmp_path)
    model, info = load_quantized(tmp_path, AutoModelForCausalLM, {"dtype": torch.float32})
    ref = quantize_model(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32))
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear4bit)
    assert info["missing_keys"] == []
    cls, info = load_quantized(
        tmp_path, AutoModelForSequenceClassification, {"num_labels": 3, "dtype": "float32"}
    )
    assert info["missing_keys"] == ["score.weight"]
    assert not cls.score.weight.is_meta and cls.score.weight.std() > 0
    assert cls(torch.zeros(1, 5, dtype=torch.long)).logits.shape == (1, 3)


def test_renamed_keys_are_refused_before_reading(tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    small = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, vocab_size=256)
    source = AutoModelForCausalLM.from_config(_llama_config(**small, num_attention_heads=4))
    source.config.save_pretrained(tmp_path)
    state = {k.replace("q_proj", "query"): v for k, v in source.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(NotStreamable, match="q_proj"):
        load_quantized(tmp_path, AutoModelForCausalLM)
