#!/usr/bin/env python3
"""Issue 17's part B figures from what device_run.sh left in OUT (and the .npy files in WORK), as
Markdown: loss-curve agreement CPU vs GPU, bf16 vs f32, embeddings across devices, and flow vs
sentence-transformers pairs/s, GPU memory and embedding texts/s.

    python3 bench/gpu/summarize.py OUT WORK
"""
import glob
import json
import os
import struct
import sys

out, work = sys.argv[1], sys.argv[2]


def load(name, default=None):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return default


def npy(path):
    """float32 rows of a NumPy 1.0 .npy file, read without numpy."""
    with open(path, "rb") as f:
        assert f.read(6) == b"\x93NUMPY"
        f.read(2)
        (hlen,) = struct.unpack("<H", f.read(2))
        header = f.read(hlen).decode()
        shape = tuple(int(x) for x in header.split("'shape': (")[1].split(")")[0].split(",") if x.strip())
        data = f.read()
    n = len(data) // 4
    return shape, struct.unpack(f"<{n}f", data)


lines = ["# GPU run (issue 17 part B)", ""]
smi = open(os.path.join(out, "nvidia-smi.txt")).read() if os.path.exists(os.path.join(out, "nvidia-smi.txt")) else ""
gpu = next((l.strip() for l in smi.splitlines() if "H200" in l or "NVIDIA" in l and "|" in l), "no nvidia-smi")
lines += [f"Device: {gpu}", ""]

# Correctness.
cpu, dev = load("f32_cpu.curve.json"), load("f32_dev.curve.json")
if cpu and dev:
    n = min(len(cpu), len(dev))
    rel = max(abs(a[1] - b[1]) / max(abs(a[1]), 1e-12) for a, b in zip(cpu[:n], dev[:n]))
    lines.append(f"- f32 loss, CPU vs GPU over {n} steps: max relative difference {rel:.2e} (goal 1e-3)")
f32, bf16 = load("f32_200.curve.json"), load("bf16_200.curve.json")
if f32 and bf16:
    def at200(c):
        xs = [v for s, v in c if 190 < s <= 200] or [v for _, v in c[-10:]]
        return sum(xs) / len(xs)
    a, b = at200(f32), at200(bf16)
    lines.append(f"- loss at step 200 (mean of steps 191-200): f32 {a:.4f}, bf16 {b:.4f}, {100 * abs(b - a) / a:.2f}% apart (goal 2%)")
if os.path.exists(os.path.join(work, "cpu.npy")) and os.path.exists(os.path.join(work, "dev.npy")):
    (s1, x), (s2, y) = npy(os.path.join(work, "cpu.npy")), npy(os.path.join(work, "dev.npy"))
    diff = max(abs(p - q) for p, q in zip(x, y)) if s1 == s2 else float("nan")
    lines.append(f"- embeddings of one checkpoint, CPU vs GPU, {s1[0]} texts x {s1[1]}: max abs difference {diff:.2e} (goal 1e-4)")
lines.append("")

# Speed.
rows = []
for status in sorted(glob.glob(os.path.join(out, "speed_*.status.json"))):
    name = os.path.basename(status)[len("speed_"):-len(".status.json")]
    size, b = name.rsplit("_b", 1)
    st = json.load(open(status))
    summary = next((s.get("summary") or {} for s in st.get("stages", []) if s["stage"] == "train"), {})
    pairs, secs = summary.get("pairs_trained"), summary.get("wall_seconds")
    flow_ps = summary.get("pairs_per_s") or (pairs / secs if pairs and secs else None)
    flow_mib = open(os.path.join(out, f"speed_{name}.gpu_mib")).read().strip() if os.path.exists(os.path.join(out, f"speed_{name}.gpu_mib")) else ""
    ref = load(f"st_{name}.json", {})
    st_mib = open(os.path.join(out, f"st_{name}.gpu_mib")).read().strip() if os.path.exists(os.path.join(out, f"st_{name}.gpu_mib")) else ""
    st_ps = ref.get("train_pairs_per_s")
    ratio = f"{flow_ps / st_ps:.2f}x" if flow_ps and st_ps else "-"
    fmt = lambda v: f"{v:,.0f}" if isinstance(v, (int, float)) else "-"
    rows.append(f"| {size} | {b} | {fmt(flow_ps)} | {fmt(st_ps)} | {ratio} | {flow_mib or '-'} | {st_mib or '-'} ({ref.get('train_peak_gib', 0):.1f} GiB allocated) | {summary.get('device', '-')} |")
if rows:
    lines += [
        "Training, bf16, max_seq_length 256 (flow: the train stage's pairs/s as its summary gives it; "
        "sentence-transformers: MNRL steps after 5 untimed ones). GPU memory: nvidia-smi's peak while each ran.",
        "",
        "| model | batch | flow pairs/s | ST pairs/s | flow/ST | flow GPU MiB | ST GPU MiB | flow device |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ] + rows + [""]
erows = []
for f in sorted(glob.glob(os.path.join(out, "flow_embed_*.json"))):
    size = os.path.basename(f)[len("flow_embed_"):-len(".json")]
    fe, se = json.load(open(f)), load(f"st_encode_{size}.json", {})
    a, b = fe.get("texts_per_s_with_load"), se.get("encode_texts_per_s")
    erows.append(f"| {size} | {fe.get('texts')} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |" if a and b else f"| {size} | {fe.get('texts')} | {a or 0:,.0f} | - | - |")
if erows:
    lines += ["Corpus embedding (flow embed, load included; SentenceTransformer.encode, batch 256, bf16 autocast)", "",
              "| model | texts | flow texts/s | ST texts/s | flow/ST |", "|---|---:|---:|---:|---:|"] + erows
print("\n".join(lines))
