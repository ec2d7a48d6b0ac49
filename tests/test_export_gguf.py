"""GGUF export on tiny Llama / Qwen2 models: the merged model read back by transformers' GGUF
loader gives the merged PyTorch model's logits (f32: 1e-5, f16: 1e-2 absolute), and the LoRA
adapter file, applied llama.cpp's way (W + alpha/r B A, r from B's shape) to the base model's
GGUF tensors, gives the merged file's tensors."""

from __future__ import annotations

import math

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM

from peftkit import LoraConfig, get_peft_model
from peftkit.export import write_lora_gguf, write_model_gguf
from peftkit.export.gguf_names import permute_rows
from tiny_models import tiny_model
from tiny_runs import make_tokenizer, vocab_size

TOLERANCE = {"f32": 1e-5, "f16": 1e-2}  # absolute, on logits of order 1


def adapted(arch: str, **lora):
    torch.manual_seed(0)
    model = tiny_model(arch, "CAUSAL_LM", hidden=64, ffn=128, vocab_size=vocab_size())
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], **lora
    )
    peft = get_peft_model(model, config)
    with torch.no_grad():  # B is zero at init: give the adapter something to export
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return peft.eval()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def read_back(path):
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_merged_gguf_reads_back_with_the_merged_logits(arch, dtype, tok, tmp_path):
    peft = adapted(arch)
    ids = torch.randint(4, vocab_size(), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
    merged = peft.merge_and_unload()
    out = write_model_gguf(merged, tok, tmp_path / "m.gguf", dtype=dtype, chat_template="{{ x }}")
    with torch.no_grad():
        got = read_back(out)(input_ids=ids).logits
    diff = (got - expected).abs().max().item()
    assert diff < TOLERANCE[dtype], diff
    reader = gguf.GGUFReader(str(out))
    fields = reader.fields
    assert fields["general.architecture"].contents() == arch
    assert fields["tokenizer.chat_template"].contents() == "{{ x }}"
    assert fields["tokenizer.ggml.tokens"].contents()[3] == "</s>"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == dtype.upper()


def _tensors(path) -> dict[str, torch.Tensor]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: torch.from_numpy(t.data.astype("float32").copy()) for t in reader.tensors}


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_gguf_applied_like_llama_cpp_gives_the_merged_weights(rslora, tok, tmp_path):
    peft = adapted("llama", use_rslora=rslora)
    lora = write_lora_gguf(peft, tmp_path / "a.gguf")
    plain = tiny_model("llama", "CAUSAL_LM", hidden=64, ffn=128, vocab_size=vocab_size())
    base = write_model_gguf(plain, tok, tmp_path / "base.gguf", dtype="f32")  # same seed
    merged = write_model_gguf(peft.merge_and_unload(), tok, tmp_path / "m.gguf", dtype="f32")
    reader = gguf.GGUFReader(str(lora))
    fields = reader.fields
    assert fields["general.type"].contents() == "adapter"
    assert fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].contents() == 8.0
    adapter, w0, w1 = _tensors(lora), _tensors(base), _tensors(merged)
    assert sorted(adapter) == sorted(
        f"blk.{i}.{m}.weight.lora_{ab}"
        for i in range(2)
        for m in ("attn_q", "attn_k", "attn_v", "ffn_down")
        for ab in "ab"
    )
    for name in {n.rsplit(".", 1)[0] for n in adapter}:
        A, B = adapter[name + ".lora_a"], adapter[name + ".lora_b"]  # (r, in), (out, r)
        scale = 8.0 / B.shape[1]  # llama.cpp: alpha / rank, rank from the tensor's shape
        torch.testing.assert_close(w0[name] + scale * B @ A, w1[name], atol=1e-5, rtol=1e-5)
    assert not math.isclose(
        float((w0["blk.0.attn_q.weight"] - w1["blk.0.attn_q.weight"]).abs().max()), 0
    )


def test_permute_rows_interleaves_the_two_halves_of_each_head():
    w = torch.arange(8.0).reshape(8, 1)  # 2 heads of 4 rows: halves (0 1)(2 3) -> 0 2 1 3
    assert permute_rows(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_refusals_name_the_way_out(tmp_path):
    peft = adapted("llama", use_dora=True)
    with pytest.raises(ValueError, match="merge RUN --gguf"):
        write_lora_gguf(peft, tmp_path / "a.gguf")
    bloom = tiny_model("bloom", "CAUSAL_LM")
    with pytest.raises(ValueError, match="supports"):
        write_model_gguf(bloom, None, tmp_path / "b.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_cli_merge_gguf_and_export_gguf_lora(tmp_path, capsys):
    from peftkit import PeftModel
    from peftkit.cli import main
    from tiny_runs import make_model

    folder = make_model("llama", tmp_path / "llama")
    base = AutoModelForCausalLM.from_pretrained(folder)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(4, vocab_size(), (1, 10), generator=torch.Generator().manual_seed(3))
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter"
    )
    with torch.no_grad():
        expected = loaded.eval()(input_ids=ids).logits
    merged = tmp_path / "out" / "merged.gguf"
    args = ["merge", str(tmp_path / "adapter"), "--gguf", str(merged), "--gguf-dtype", "f32"]
    assert main(args) == 0
    assert main(args) == 2  # exists: --overwrite needed
    assert "--overwrite" in capsys.readouterr().err
    with torch.no_grad():
        got = read_back(merged)(input_ids=ids).logits
    assert (got - expected).abs().max().item() < TOLERANCE["f32"]
    lora = tmp_path / "out" / "adapter.gguf"
    assert main(["export", str(tmp_path / "adapter"), "--gguf-lora", str(lora)]) == 0
    names = {t.name for t in gguf.GGUFReader(str(lora)).tensors}
    assert "blk.1.attn_k.weight.lora_b" in names and len(names) == 8
    assert main(["merge", str(tmp_path / "adapter")]) == 2  # neither --output nor --gguf


def test_export_help(capsys):
    from peftkit.cli import main

    with pytest.raises(SystemExit) as info:
        main(["export", "--help"])
    assert info.value.code == 0
    assert "--gguf-lora" in capsys.readouterr().out
