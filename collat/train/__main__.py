"""`python -m collat.train`: the training command line. Every field of CoLLATConfig and TrainConfig is
an option (generated from the dataclasses by transformers' HfArgumentParser, so none can go missing);
values come from the preset, then --config, then the options given."""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch.distributed as dist

from collat.config import (
    CoLLATConfig,
    ConfigError,
    TrainConfig,
    load_preset,
    preset_names,
    read_config_file,
)

DESCRIPTION = """Train CoLLAT: a locked text encoder learns to understand audio through an AST audio encoder
and a token interaction module (token loss after greedy matching, contrastive loss, noise-robustness
loss), then evaluate zero-shot classification against the untrained model.

With no options: the CPU preset on the embedded soundfont data (clips of 30 General MIDI instruments
and sound effects, 1-3 mixed per clip, rendered on the fly; nothing is downloaded), about 10 minutes on
2 cores. --preset paper selects the paper's sizes for a GPU (AST-base, CLIP ViT-B-32 text tower)."""
EPILOG = """run folder (--out): checkpoint/ (replaced atomically; Ctrl-C or SIGTERM finishes the step, saves one and
stops; --resume continues bit-exactly on CPU from the newest complete checkpoint, wherever a crash left it;
a changed --lr, --weight-decay, --warmup-steps or --steps applies from the resumed step, a changed batch
size or seed is refused), log.jsonl (one line per step, written every --log-every steps; evaluations of
--eval-every too; never deleted: a fresh start keeps the old one as log.jsonl.N), tensorboard/ (with
--report-to tensorboard), losses.png, results.json.

config files (--config FILE.json / FILE.yaml): {"model": {CoLLATConfig fields}, "train": {TrainConfig
fields}}, applied over the preset; options given on the command line win. Presets: collat/configs/*.json.

several GPUs or machines: torchrun --nproc_per_node=K -m collat.train ... (DistributedDataParallel; the
contrastive loss gathers features across ranks as open_clip does; a checkpoint resumes under any K)."""

SHORTHANDS = {  # extra spellings kept from earlier versions of this command line: flag -> (field, value)
    "--reference-ops": ("fused", False),
    "--no-eval": ("evaluate", False),
    "--no-local-loss": ("local_loss", False),
}


def build_parser(preset: tuple[CoLLATConfig, TrainConfig]) -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((CoLLATConfig, TrainConfig), prog="python -m collat.train", description=DESCRIPTION,
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=preset_names(), default="cpu",
                        help="starting values: cpu (the default run) or paper (the paper's sizes, for a GPU)")
    parser.add_argument("--config", help="JSON or YAML file of model and train values applied over the preset "
                                          "(see below)")
    for flag, (name, value) in SHORTHANDS.items():
        parser.add_argument(flag, dest=name, action="store_const", const=value, help=f"same as --{name} {value}")
    defaults = {**dataclasses.asdict(preset[0]), **dataclasses.asdict(preset[1])}
    for action in parser._actions:
        if action.dest not in defaults:
            continue
        action.option_strings.sort(key=lambda option: "_" in option)  # --dashed-form first in the usage
        if action.const is not False and defaults[action.dest] is not None:
            action.help = f"{action.help} (default: {defaults[action.dest]})"
        action.default = argparse.SUPPRESS  # the namespace then holds only what was given
    return parser


def parse_args(argv=None) -> tuple[CoLLATConfig, TrainConfig]:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", choices=preset_names(), default="cpu")
    first.add_argument("--config")
    known, _ = first.parse_known_args(argv)
    parser = build_parser(load_preset(known.preset))
    args = vars(parser.parse_args(argv))
    model_values, train_values = (dataclasses.asdict(c) for c in load_preset(args.pop("preset")))
    config_path = args.pop("config")
    try:
        if config_path:
            payload = read_config_file(config_path)
            model_values.update(payload.get("model", {}))
            train_values.update(payload.get("train", {}))
            _validate(model_values, train_values, lambda section, field: f"config file {config_path}: {section}.{field}")
        _apply_options(args, model_values, train_values)
        return _validate(model_values, train_values, lambda section, field: f"argument --{field.replace('_', '-')}:"
                         if field in args else field)
    except (FileNotFoundError, TypeError, ValueError) as error:
        parser.error(str(error))


def _validate(model_values: dict, train_values: dict, where) -> tuple[CoLLATConfig, TrainConfig]:
    """Both configs, checked; an error names its field as `where(section, field)` says (a flag, a file)."""
    configs = []
    for section, cls, values in (("model", CoLLATConfig, model_values), ("train", TrainConfig, train_values)):
        config = cls.from_dict(values)
        try:
            config.validate()
        except ConfigError as error:
            raise ValueError(f"{where(section, error.field)} {error.detail}") from None
        configs.append(config)
    return configs[0], configs[1]


def _apply_options(given: dict, model_values: dict, train_values: dict) -> None:
    model_fields = {f.name for f in dataclasses.fields(CoLLATConfig)}
    for name, value in given.items():
        (model_values if name in model_fields else train_values)[name] = value
    if given.get("text_encoder", "").startswith("clip:") and "context_length" not in given:
        model_values["context_length"] = None  # CLIP's context is fixed at 77
    if given.get("audio_checkpoint") and "window_type" not in given:
        model_values["window_type"] = "hanning"  # what pretrained AST checkpoints were trained with


def main(argv=None) -> int:
    from collat.data.manifest import UnreadableDataError
    from collat.train.checkpoint import find_checkpoint
    from collat.train.loop import NonFiniteLossError, run

    model_config, train_config = parse_args(argv)
    try:
        run(model_config, train_config)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, UnreadableDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full or read-only disk: what was saved before is intact
        kept = find_checkpoint(train_config.out)
        print(f"error: {e}; the last complete checkpoint is {kept or 'none'}", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
