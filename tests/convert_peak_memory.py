"""Peak memory of `kvp-mlx convert` on a synthetic ~1 GB float32 checkpoint (a script, not a test).

    python tests/convert_peak_memory.py [--kind single|kvp] [--keep DIR]

Writes the checkpoint tensor by tensor (the writer never holds it whole), runs the converter in a
child process and prints the child's peak resident set size (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from convert_helpers import Storage, Tensor, contiguous_strides, write_torch_zip  # noqa: E402

# ~1.03 GB in float32: vocab 32128 x dim 2048 tied embeddings + 4 layers of 48.2M parameters.
BIG = dict(
    num_transformer_layers=4, model_dim=2048, head_dim=64, num_query_heads=[32] * 4, num_kv_heads=[8] * 4,
    ffn_multipliers=[3.0] * 4, ffn_dim_divisor=256, vocab_size=32128,
)
SMALL = dict(BIG, num_transformer_layers=2, num_query_heads=[16] * 2, num_kv_heads=[4] * 2, ffn_multipliers=[1.0] * 2)


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    d, hd = cfg["model_dim"], cfg["head_dim"]
    out = {"token_embeddings.weight": (cfg["vocab_size"], d)}
    for i in range(cfg["num_transformer_layers"]):
        q, kv = cfg["num_query_heads"][i], cfg["num_kv_heads"][i]
        ffn = int(cfg["ffn_multipliers"][i] * d)
        out |= {
            f"layers.{i}.attn.qkv_proj.weight": ((q + 2 * kv) * hd, d), f"layers.{i}.attn.q_norm.weight": (hd,),
            f"layers.{i}.attn.k_norm.weight": (hd,), f"layers.{i}.attn.out_proj.weight": (d, q * hd),
            f"layers.{i}.ffn.proj_1.weight": (2 * ffn, d), f"layers.{i}.ffn.proj_2.weight": (d, ffn),
            f"layers.{i}.attn_norm.weight": (d,), f"layers.{i}.ffn_norm.weight": (d,),
        }
    return out | {"norm.weight": (d,)}


def lazy_tensor(shape: tuple[int, ...], seed: int) -> Tensor:
    n = int(np.prod(shape))
    fill = lambda: (np.random.default_rng(seed).standard_normal(n, dtype=np.float32) * 0.02).tobytes()  # noqa: E731
    return Tensor(Storage("float32", numel=n, fill=fill), 0, shape, contiguous_strides(shape))


def build(kind: str, root: Path) -> list[str]:
    """Write the checkpoint + YAML + configs; returns the converter's arguments."""
    models = {"model": BIG} if kind == "single" else {"base": BIG, "aux": SMALL}
    state: OrderedDict = OrderedDict()
    prefix = {"model": "", "base": "base.", "aux": "auxiliary."}
    for role, cfg in models.items():
        (root / f"{role}.json").write_text(json.dumps(cfg))
        for name, shape in shapes(cfg).items():
            state[prefix[role] + name] = lazy_tensor(shape, len(state))
    lm = {"general_gpt": {"model_name": "synthetic", "vocab_size": BIG["vocab_size"]}}
    if kind == "single":
        yaml_text = json.dumps({"model": {"language_modeling": {"name": "general_gpt", **lm}}})
        args = ["--model-config", str(root / "model.json")]
    else:
        mapping = [0, 0, 1, 1]
        for i, j in enumerate(mapping):
            out_dim, in_dim = BIG["num_kv_heads"][i] * 64, SMALL["num_kv_heads"][j] * 64
            for kind_ in ("key_transforms", "value_transforms"):
                state[f"predicter.auxkv_to_basekv.{kind_}.{i}.weight"] = lazy_tensor((out_dim, in_dim), len(state))
                state[f"predicter.auxkv_to_basekv.{kind_}.{i}.bias"] = lazy_tensor((out_dim,), len(state))
        sub = lambda: [{"model": {"language_modeling": {"name": "general_gpt", **lm}}}]  # noqa: E731
        kvp = {"auxkv_num_layers_to_basekv_num_layers": mapping, "base_model": sub(), "auxiliary_model": sub()}
        yaml_text = json.dumps({"model": {"language_modeling": {"name": "kv_prediction", "kv_prediction": kvp, **lm}}})
        args = ["--base-config", str(root / "base.json"), "--aux-config", str(root / "aux.json")]
    (root / "train.yaml").write_text(yaml_text)  # JSON is valid YAML
    write_torch_zip(root / "synthetic.pt", state, root="synthetic")
    return ["--checkpoint", str(root / "synthetic.pt"), "--config", str(root / "train.yaml"), *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=("single", "kvp"), default="single")
    parser.add_argument("--keep", help="work in this directory and keep it")
    opts = parser.parse_args()
    root = Path(opts.keep or tempfile.mkdtemp(prefix="kvp-mem-"))
    root.mkdir(parents=True, exist_ok=True)
    args = build(opts.kind, root)
    size = (root / "synthetic.pt").stat().st_size
    cmd = [sys.executable, "-m", "kvp_mlx.convert.cli", *args, "--out", str(root / "out"), "--force"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    elapsed = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    out_bytes = sum(p.stat().st_size for p in (root / "out").rglob("*.safetensors"))
    print(
        f"{opts.kind}: checkpoint {size / 1e9:.3f} GB, output {out_bytes / 1e9:.3f} GB, "
        f"converter peak RSS {peak_kib / 2**20:.3f} GiB ({peak_kib * 1024 / 1e9:.3f} GB), {elapsed:.1f} s"
    )
    if not opts.keep:
        import shutil

        shutil.rmtree(root)


if __name__ == "__main__":
    main()
