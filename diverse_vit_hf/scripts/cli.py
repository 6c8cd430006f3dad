"""`diverse-vit` command line: training, redundancy analysis, model cards and Hub uploads.

    diverse-vit train   [the flags of examples/run_diverse.py, or one args.json / args.yaml]
    diverse-vit analyze --model A [--model B ...] [--dataset mnist|digits|lfw|<hub dataset>] [--num_images 256]
                        [--batch_size 32] --output_dir report/
    diverse-vit card    --model_dir D [--repo_id R] [--dataset_name ...]
    diverse-vit push    --model_dir D --repo_id R [--endpoint URL] [--private] [--token T]

`train` is `examples/run_diverse.py` (`diverse_vit_hf.scripts.train`), with its flags (`diverse-vit train --help`) and
its exit codes (0, 2, 3, 4, 5, 75). `push` reads the token from `--token` or the `HF_TOKEN` environment variable (else
the locally saved login) and never prints it. Bad input exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..analysis import QKV_MATRICES, WEIGHT_MATRICES, analyze_checkpoints, load_analysis_images, write_report
from ..data.image_datasets import EMBEDDED_DATASETS

logger = logging.getLogger("diverse_vit_hf.scripts.cli")


def _add_card_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model card (override diverse_vit_card.json in the model folder)")
    group.add_argument("--dataset_name", help="Human-readable name of the training data, e.g. 'MNIST'.")
    group.add_argument("--dataset_id", help="Hub dataset id for the card metadata and model-index, e.g. ylecun/mnist.")
    group.add_argument("--dataset_split", help="Split the evaluation results were measured on.")
    group.add_argument("--base_model", help="Hub id of the checkpoint the model was fine-tuned from.")
    group.add_argument("--license", help="License id for the card metadata (default apache-2.0).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diverse-vit", description="Diverse-ViT training, redundancy analysis and Hub tools."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    # Listed here for `diverse-vit --help`; `main` hands everything after `train` to the training script's own parser.
    commands.add_parser(
        "train",
        add_help=False,
        help="Train or evaluate a classifier with the Diverse-ViT regularizers: the flags of examples/run_diverse.py "
        "(diverse-vit train --help).",
    )
    analyze = commands.add_parser(
        "analyze",
        help="Measure patch-embedding, attention and weight redundancy of checkpoints of the supported families.",
        description="Writes redundancy.json, one PNG per level and report.md into --output_dir.",
    )
    analyze.add_argument("--model", action="append", required=True, help="Hub id or local folder; repeat to compare.")
    analyze.add_argument("--name", action="append", help="Display name per --model (default: folder name or Hub id).")
    analyze.add_argument(
        "--dataset",
        default="mnist",
        help=f"Embedded offline set ({', '.join(sorted(EMBEDDED_DATASETS))}) or a Hub/local dataset for "
        "datasets.load_dataset (default: mnist).",
    )
    analyze.add_argument("--dataset_config", help="Configuration name of a Hub dataset.")
    analyze.add_argument("--split", help="Split of a Hub dataset (default: validation/test, else held out from train).")
    analyze.add_argument("--image_column", help="Image column of a Hub dataset (auto-detected).")
    analyze.add_argument("--num_images", type=int, default=256, help="Held-out images to analyze (default 256).")
    analyze.add_argument("--batch_size", type=int, default=32, help="Images per forward (default 32).")
    analyze.add_argument(
        "--seed", type=int, default=42, help="Seed of the held-out split and image order (default 42)."
    )
    analyze.add_argument(
        "--held_out_fraction",
        type=float,
        default=0.1,
        help="Held-out fraction for single-split data; use the --train_val_split of run_diverse.py (default 0.1).",
    )
    analyze.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N.")
    analyze.add_argument(
        "--weight_matrices",
        nargs="+",
        default=list(QKV_MATRICES),
        choices=WEIGHT_MATRICES,
        help="Per-block matrices for the weight statistics (default: q_proj k_proj v_proj).",
    )
    analyze.add_argument("--title", help="Title of report.md.")
    analyze.add_argument("--output_dir", required=True, help="Folder for redundancy.json, the plots and report.md.")
    analyze.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")

    card = commands.add_parser("card", help="Write README.md (model card) into a saved model folder.")
    card.add_argument("--model_dir", required=True, help="Saved model folder (config.json, weights, processor).")
    card.add_argument("--repo_id", help="namespace/name the card is for (usage snippet and widget URLs).")
    card.add_argument("--endpoint", default="https://huggingface.co", help="Hub URL used in widget image URLs.")
    _add_card_arguments(card)

    push = commands.add_parser(
        "push", help="Upload weights, processor config, card and plots to the Hub in one commit."
    )
    push.add_argument("--model_dir", required=True, help="Saved model folder.")
    push.add_argument("--repo_id", required=True, help="Target repository, namespace/name.")
    push.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or https://huggingface.co).")
    push.add_argument("--private", action="store_true", help="Create the repository as private.")
    push.add_argument("--token", help="Write token (default: $HF_TOKEN, else the saved login). Never printed.")
    push.add_argument("--commit_message", default="Upload Diverse-ViT model, card and redundancy analysis")
    push.add_argument("--revision", help="Branch to commit to (default main).")
    push.add_argument(
        "--keep_card",
        action="store_true",
        help="Upload the folder's README.md as it is instead of regenerating it for --repo_id.",
    )
    _add_card_arguments(push)
    return parser


def _run_analyze(args: argparse.Namespace) -> int:
    images = load_analysis_images(
        args.dataset,
        args.num_images,
        seed=args.seed,
        held_out_fraction=args.held_out_fraction,
        split=args.split,
        dataset_config=args.dataset_config,
        image_column=args.image_column,
    )
    report = analyze_checkpoints(
        args.model,
        images,
        names=args.name,
        batch_size=args.batch_size,
        device=args.device,
        weight_matrices=args.weight_matrices,
        progress=not args.no_progress,
        seed=args.seed,
    )
    files = write_report(report, args.output_dir, title=args.title)
    from ..analysis import summary_table_markdown

    print(summary_table_markdown(report))
    print(f"\nWrote {files.json}, {files.markdown} and {len(files.plots)} plots to {Path(args.output_dir)}")
    return 0


def _card_inputs(args: argparse.Namespace):
    from dataclasses import replace

    from ..hub.model_card import CARD_METADATA_FILE, CardInputs

    stored = Path(args.model_dir) / CARD_METADATA_FILE
    if stored.is_file():
        import json

        inputs = CardInputs.from_dict(json.loads(stored.read_text(encoding="utf-8")))
    else:
        inputs = CardInputs()
    overrides = {
        key: getattr(args, key)
        for key in ("dataset_name", "dataset_id", "dataset_split", "base_model", "license")
        if getattr(args, key) is not None
    }
    return replace(inputs, **overrides)


def _run_card(args: argparse.Namespace, token: str | None = None) -> int:
    from ..hub.model_card import card_from_folder, save_model_card

    if not Path(args.model_dir).is_dir():
        raise ValueError(f"Model folder {args.model_dir!r} does not exist.")
    card = card_from_folder(args.model_dir, args.repo_id, _card_inputs(args), endpoint=args.endpoint)
    path = save_model_card(card, args.model_dir, token=token)
    print(f"Wrote the model card {path}")
    return 0


def _run_push(args: argparse.Namespace) -> int:
    from ..hub.model_card import files_to_push, push_model_folder

    token = args.token or os.environ.get("HF_TOKEN") or None
    if not args.keep_card:
        card_args = argparse.Namespace(**vars(args))
        card_args.endpoint = args.endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        _run_card(card_args, token=token)
    files = files_to_push(args.model_dir)
    info = push_model_folder(
        args.model_dir,
        args.repo_id,
        endpoint=args.endpoint,
        token=token,
        private=args.private,
        commit_message=args.commit_message,
        revision=args.revision,
    )
    print(f"Pushed {len(files)} files in one commit: {getattr(info, 'commit_url', info)}")
    for name in files:
        print(f"  {name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `diverse-vit` console script. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from .train import main_with_exit_codes

        return main_with_exit_codes(argv[1:], prog="diverse-vit train")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        if args.command == "analyze":
            return _run_analyze(args)
        if args.command == "card":
            return _run_card(args)
        return _run_push(args)
    except (ValueError, OSError) as error:
        print(f"diverse-vit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        from huggingface_hub.errors import HfHubHTTPError

        if isinstance(error, HfHubHTTPError):
            print(f"diverse-vit {args.command}: the Hub refused the request: {error}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
