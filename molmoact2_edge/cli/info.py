"""``molmo-edge info CKPT``: what a checkpoint holds (config summary, parameters per component, dtypes, norm tags).

Reads only headers: the weights are never loaded, so this is instant even for the 4B
release. torch is imported inside the command (the model is built on the meta
device to count parameters per component).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import click


def checkpoint_info(ckpt: Path) -> dict[str, Any]:
    """A JSON-able summary of a checkpoint directory (CheckpointError if it is not one)."""
    import torch
    from safetensors import SafetensorError, safe_open

    from molmoact2_edge.checkpoint import INDEX_FILE, SINGLE_FILE, load_config, load_norm_stats, weight_files
    from molmoact2_edge.errors import CheckpointError
    from molmoact2_edge.model.molmoact2 import MolmoAct2

    config = load_config(ckpt)
    files = weight_files(ckpt)
    shards = sorted(set(files.values())) or [ckpt / SINGLE_FILE]
    dtypes: Counter[str] = Counter()
    stored = 0
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118
                    sl = f.get_slice(name)
                    dtypes[sl.get_dtype()] += 1
                    stored += 1
        except SafetensorError as err:
            raise CheckpointError(f"{shard}: unreadable safetensors header ({err})") from err
    with torch.device("meta"):
        counts = MolmoAct2(config).parameter_counts()
    norm = load_norm_stats(ckpt, config)
    text, vit = config.text_config, config.vit_config
    expert = config.action_expert_config
    return {
        "path": str(ckpt),
        "weights": {"files": [s.name for s in shards], "index": (ckpt / INDEX_FILE).exists(), "tensors": stored,
                    "dtypes": dict(dtypes)},
        "parameters": counts,
        "vision": {"image_size": list(vit.image_default_input_size), "patch": vit.image_patch_size,
                   "width": vit.hidden_size, "blocks": config.num_vit_blocks, "tokens_per_image": config.tokens_per_image},
        "llm": {"width": text.hidden_size, "layers": text.num_hidden_layers, "heads": text.num_attention_heads,
                "kv_heads": text.num_key_value_heads, "head_dim": text.head_dim, "vocab": text.vocab_size},
        "action_expert": None if expert is None else {"width": expert.hidden_size, "layers": expert.num_layers,
                                                      "heads": expert.num_heads, "mlp": expert.mlp_hidden},
        "action": {"mode": config.action_mode, "max_dim": config.max_action_dim,
                   "max_horizon": config.max_action_horizon, "flow_steps": config.flow_matching_num_steps},
        "depth_reasoning": config.enable_depth_reasoning,
        "norm_stats": None if norm is None else {
            "norm_mode": norm.norm_mode,
            "tags": {name: {"action_dim": m.action_dim, "state_dim": m.state_dim, "horizon": m.action_horizon,
                            "setup_type": m.setup_type, "control_mode": m.control_mode}
                     for name, m in norm.tags.items()},
        },
    }


def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f}M" if n < 1e9 else f"{n / 1e9:,.3f}B"


@click.command("info")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(ckpt: Path, as_json: bool) -> None:
    """Summarize a MolmoAct2 checkpoint directory without loading its weights.

    \b
    Examples:
      molmo-edge info checkpoints/molmoact2-small
      molmo-edge info ~/models/MolmoAct2-SO100_101 --json
    """
    data = checkpoint_info(ckpt)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    w, v, lm, a = data["weights"], data["vision"], data["llm"], data["action"]
    click.echo(f"checkpoint  {data['path']}")
    click.echo(f"weights     {len(w['files'])} file(s), {w['tensors']} tensors, dtypes {w['dtypes']}")
    click.echo(f"vision      {v['image_size'][0]}x{v['image_size'][1]} px, patch {v['patch']}, width {v['width']}, "
               f"{v['blocks']} blocks, {v['tokens_per_image']} tokens/camera")
    click.echo(f"llm         width {lm['width']}, {lm['layers']} layers, {lm['heads']}/{lm['kv_heads']} heads x "
               f"{lm['head_dim']}, vocab {lm['vocab']}")
    if data["action_expert"]:
        e = data["action_expert"]
        click.echo(f"expert      width {e['width']}, {e['layers']} layers, {e['heads']} heads, mlp {e['mlp']}")
    click.echo(f"actions     mode {a['mode']}, max dim {a['max_dim']}, max horizon {a['max_horizon']}, "
               f"{a['flow_steps']} flow steps")
    click.echo("parameters  " + ", ".join(f"{k} {_millions(n)}" for k, n in data["parameters"].items() if n))
    norm = data["norm_stats"]
    if norm is None:
        click.echo("norm stats  none")
    else:
        click.echo(f"norm stats  {norm['norm_mode']}")
        for name, t in norm["tags"].items():
            click.echo(f"  {name}: action {t['action_dim']}, state {t['state_dim']}, horizon {t['horizon']}, "
                       f"setup {t['setup_type']!r}, control {t['control_mode']!r}")
