"""Convert checkpoints: ours to OpenCLIP or timm, SLIP-reference or OpenCLIP ones to ours.

    python tools/convert_checkpoint.py --to openclip  runs/x/checkpoints/step_N.pt  out/openclip_dir
    python tools/convert_checkpoint.py --to timm      runs/x/checkpoints/step_N.pt  out/timm_dir
    python tools/convert_checkpoint.py --from slip-reference slip_base_25ep.pt  out/ours.pt
    python tools/convert_checkpoint.py --from openclip  open_clip_pytorch_model.bin --model ViT-B-16  out/ours.pt

--to openclip writes a folder `open_clip.create_model_and_transforms("local-dir:DIR")` loads (CLIP,
SLIP and xCLIP models whose towers OpenCLIP can build exactly; the SimCLR and nCLIP heads are left
out, and said so). --to timm writes the image tower alone, for `timm.create_model("local-dir:DIR",
pretrained=True)` (every preset). --from writes our checkpoint format, which tools/evaluate.py,
finetuning and `model.init_from=PATH` read; it carries the source's preprocessing (mean / std).
Every source key is mapped or reported as dropped; anything that cannot be converted exactly
stops the tool with one line saying why. docs/CONVERT.md has the details.
"""
from __future__ import annotations

import argparse
import sys

from trainer.checkpoint import CheckpointError, load_model
from trainer.convert import (ConversionError, export_openclip, export_timm, known_models, read_openclip,
                             read_slip_reference)
from trainer.dataclass_io import ConfigError
from pipeline.cli import report, run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=("openclip", "timm"), help="export one of our checkpoints")
    direction.add_argument("--from", dest="source", choices=("slip-reference", "openclip"),
                           help="import a foreign checkpoint into our format")
    p.add_argument("--model", help=f"OpenCLIP model name for --from openclip weights files (one of "
                                   f"{', '.join(sorted(known_models()))}); a folder with open_clip_config.json "
                                   "names its own")
    p.add_argument("--config", help="--to: the run config YAML for a checkpoint that stores none "
                                    "(default: the stored one, else the run's config.yaml)")
    p.add_argument("input", help="checkpoint file (or OpenCLIP folder)")
    p.add_argument("output", help="--to: output folder; --from: output checkpoint file (.pt)")
    return p.parse_args(argv)


def export(args) -> list[str]:
    model, run_cfg = load_model(args.input, args.config)
    writer = export_openclip if args.to == "openclip" else export_timm
    return writer(model, run_cfg, args.output) + [f"wrote {args.output}"]


def import_(args) -> list[str]:
    if args.source == "openclip":
        converted = read_openclip(args.input, args.model)
    else:
        if args.model:
            raise ConversionError("--model is for --from openclip (a SLIP-reference checkpoint names its model)")
        converted = read_slip_reference(args.input)
    path = converted.save(args.output)
    cfg = converted.model
    lines = [f"{converted.source} -> {converted.objective} model ({len(converted.state)} tensors; image tower "
             f"{cfg.vision_width} wide, {cfg.vision_layers} blocks, {cfg.vision_heads} heads, {cfg.image_size} px)",
             f"preprocessing: mean {list(converted.mean)}, std {list(converted.std)}"]
    lines += [f"dropped {d}" for d in converted.dropped]
    return lines + [f"wrote {path}"]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        lines = export(args) if args.to else import_(args)
    except (ConversionError, CheckpointError, ConfigError, FileNotFoundError) as e:
        return report(e, 2)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
