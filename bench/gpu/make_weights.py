#!/usr/bin/env python3
"""A sentence-transformers folder with BERT weights drawn from a fixed seed (HF BertModel's init:
normal(0, 0.02), LayerNorm 1/0, biases 0), for runs whose real weights do not fit the carry. flow
and PyTorch load the same file. Uses torch where it is installed (fast), else plain Python (for
tiny test configs on a machine without torch).

    python3 make_weights.py OUT_DIR --tokenizer DIR --hidden 384 --layers 6 --heads 12 --intermediate 1536 --seed 7
"""
import argparse
import array
import json
import os
import random
import shutil
import struct

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json, vocab.txt, tokenizer_config.json")
p.add_argument("--hidden", type=int, default=384)
p.add_argument("--layers", type=int, default=6)
p.add_argument("--heads", type=int, default=12)
p.add_argument("--intermediate", type=int, default=1536)
p.add_argument("--vocab", type=int, default=30522)
p.add_argument("--max-seq", type=int, default=256)
p.add_argument("--seed", type=int, default=7)
a = p.parse_args()

H, I = a.hidden, a.intermediate
shapes = {
    "embeddings.word_embeddings.weight": [a.vocab, H],
    "embeddings.position_embeddings.weight": [512, H],
    "embeddings.token_type_embeddings.weight": [2, H],
    "embeddings.LayerNorm.weight": [H],
    "embeddings.LayerNorm.bias": [H],
}
for i in range(a.layers):
    L = f"encoder.layer.{i}."
    for n in ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]:
        shapes[L + n + ".weight"] = [H, H]
        shapes[L + n + ".bias"] = [H]
    shapes[L + "attention.output.LayerNorm.weight"] = [H]
    shapes[L + "attention.output.LayerNorm.bias"] = [H]
    shapes[L + "intermediate.dense.weight"] = [I, H]
    shapes[L + "intermediate.dense.bias"] = [I]
    shapes[L + "output.dense.weight"] = [H, I]
    shapes[L + "output.dense.bias"] = [H]
    shapes[L + "output.LayerNorm.weight"] = [H]
    shapes[L + "output.LayerNorm.bias"] = [H]
shapes["pooler.dense.weight"] = [H, H]
shapes["pooler.dense.bias"] = [H]


def kind(name):
    if "LayerNorm.weight" in name:
        return 1.0
    if name.endswith(".bias") or "LayerNorm" in name:
        return 0.0
    return None  # normal(0, 0.02)


def count(shape):
    n = 1
    for s in shape:
        n *= s
    return n


blobs = {}
try:
    import torch

    g = torch.Generator().manual_seed(a.seed)
    for name in sorted(shapes):
        v = kind(name)
        t = torch.full(shapes[name], v) if v is not None else torch.randn(shapes[name], generator=g) * 0.02
        t = t.to(torch.float32).contiguous()
        try:
            blobs[name] = t.numpy().tobytes()
        except Exception:  # torch without numpy
            blobs[name] = bytes(t.untyped_storage())
    made_by = f"torch {torch.__version__}"
except ImportError:
    rng = random.Random(a.seed)
    for name in sorted(shapes):
        v, n = kind(name), count(shapes[name])
        xs = array.array("f", [v] * n) if v is not None else array.array("f", (rng.gauss(0.0, 0.02) for _ in range(n)))
        blobs[name] = xs.tobytes()
    made_by = "python random"

os.makedirs(os.path.join(a.out, "1_Pooling"), exist_ok=True)
header, offset = {}, 0
for name in sorted(blobs):
    header[name] = {"dtype": "F32", "shape": shapes[name], "data_offsets": [offset, offset + len(blobs[name])]}
    offset += len(blobs[name])
header["__metadata__"] = {"format": "pt", "seed": str(a.seed), "made_by": made_by}
h = json.dumps(header, separators=(",", ":")).encode()
h += b" " * ((8 - len(h) % 8) % 8)
with open(os.path.join(a.out, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(h)))
    f.write(h)
    for name in sorted(blobs):
        f.write(blobs[name])

config = {
    "architectures": ["BertModel"], "model_type": "bert", "hidden_size": H, "num_hidden_layers": a.layers,
    "num_attention_heads": a.heads, "intermediate_size": I, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
    "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0, "vocab_size": a.vocab,
    "position_embedding_type": "absolute",
}
json.dump(config, open(os.path.join(a.out, "config.json"), "w"), indent=2)
modules = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]
json.dump(modules, open(os.path.join(a.out, "modules.json"), "w"), indent=2)
json.dump({"word_embedding_dimension": H, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
           "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False},
          open(os.path.join(a.out, "1_Pooling", "config.json"), "w"), indent=2)
json.dump({"max_seq_length": a.max_seq, "do_lower_case": False},
          open(os.path.join(a.out, "sentence_bert_config.json"), "w"), indent=2)
for f in os.listdir(a.tokenizer):
    shutil.copy(os.path.join(a.tokenizer, f), a.out)
print(f"{a.out}: {a.layers} layers x {H}, {offset / 4 / 1e6:.1f}M parameters ({made_by}, seed {a.seed})")
