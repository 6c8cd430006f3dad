"""diverse_vit_hf.hub.model_card: card content and metadata (offline round trip), no leaked paths/tokens, a saved folder
that loads in a vanilla pipeline, and the single-commit upload against a local HTTP endpoint and at the HfApi
boundary."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from fixtures.builders import build_trainer, make_args
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from transformers import ResNetConfig, ViTImageProcessor

from diverse_vit_hf import DiverseTrainingArguments, DiverseViTForImageClassification, DiversityConfig
from diverse_vit_hf.analysis import PLOT_FILES, RedundancyReport, analyze_model, tensor_batches, write_report
from diverse_vit_hf.hub.model_card import (
    CardInputs,
    build_model_card,
    card_from_folder,
    check_card_is_safe,
    files_to_push,
    push_model_folder,
    save_model_card,
    save_widget_images,
    validate_card_offline,
)
from diverse_vit_hf.scripts.cli import main as cli_main

TOKEN = "hf_" + "T0kenForTestsOnly" * 2  # looks like a real token: must never reach a card or stdout
SECRET = "hf_secretTOKENabcdefghijklmnopqrstuvwxyz0123"
EXPECTED_FILES = {
    "config.json",
    "preprocessor_config.json",
    "README.md",
    "model.safetensors",
    "redundancy.json",
    *PLOT_FILES.values(),
    "examples/held-out_digit_1.png",
    "examples/held-out_digit_2.png",
}
MNIST_CARD = CardInputs(
    dataset_name="MNIST",
    dataset_id="ylecun/mnist",
    dataset_split="heldout",
    dataset_description="Real MNIST digits.",
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_model_folder(folder: Path, config, baseline: bool = False) -> Path:
    """A folder as run_diverse.py + compare_redundancy.py leave it: weights, processor, training args (holding a local
    output_dir), eval results, redundancy report and plots, widget images and card inputs."""
    torch.manual_seed(0)
    config.id2label = {i: str(i) for i in range(config.num_labels)}
    config.label2id = {str(i): i for i in range(config.num_labels)}
    model = DiverseViTForImageClassification(config).eval()
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        folder
    )
    coefficients = ["patch_cosine_coef", "patch_contrastive_coef", "attention_cosine_coef", "weight_condition_coef"]
    overrides = dict.fromkeys(coefficients, 0.0) | {"mixing": False, "patch_mixing_loss": False} if baseline else {}
    args = DiverseTrainingArguments(output_dir=str(folder), report_to="none", hub_token=TOKEN, **overrides)
    (folder / "training_args.json").write_text(args.to_json_string())
    (folder / "eval_results.json").write_text(json.dumps({"eval_top1": 0.75, "eval_top5": 1.0}))
    result = analyze_model(model, tensor_batches(torch.randn(4, 3, 32, 32), 4), name="diversified", progress=False)
    write_report(RedundancyReport([result], {"dataset": "mnist", "split": "heldout"}, 4), folder)
    (folder / "report.md").unlink()  # the folder keeps the JSON and plots only, as compare_redundancy.py does
    digits = [Image.fromarray((np.random.RandomState(i).rand(28, 28) * 255).astype("uint8"), mode="L") for i in (1, 2)]
    save_widget_images([(digit, f"held-out digit {i + 1}") for i, digit in enumerate(digits)], folder)
    MNIST_CARD.save(folder)
    save_model_card(card_from_folder(folder, "user/diverse-vit-tiny", endpoint="https://huggingface.co"), folder)
    return folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    from transformers import ViTConfig

    config = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=5)  # fmt: skip
    return make_model_folder(tmp_path_factory.mktemp("diverse") / "model", config)


# ------------------------------------------------------------------------------------------------ card content


def test_card_metadata_round_trips_through_model_card_load(model_folder):
    card = ModelCard.load(model_folder / "README.md", ignore_metadata_errors=False)
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert data.license == "apache-2.0" and data.datasets == ["ylecun/mnist"] and data.metrics == ["accuracy"]
    assert {"diverse-vit", "vision", "image-classification", "vit"} <= set(data.tags)
    results = {r.metric_type: r for r in data.eval_results}
    assert results["accuracy"].metric_value == 0.75 and results["top_5_accuracy"].metric_value == 1.0
    assert results["accuracy"].task_type == "image-classification"
    assert results["accuracy"].dataset_type == "ylecun/mnist" and results["accuracy"].dataset_split == "heldout"
    assert data.model_name == "diverse-vit-tiny"
    widget = data.to_dict()["widget"]
    assert [w["src"] for w in widget] == [
        "https://huggingface.co/user/diverse-vit-tiny/resolve/main/examples/held-out_digit_1.png",
        "https://huggingface.co/user/diverse-vit-tiny/resolve/main/examples/held-out_digit_2.png",
    ]
    assert validate_card_offline(model_folder / "README.md").data.pipeline_tag == "image-classification"


def test_card_text_has_recipe_redundancy_usage_and_citation(model_folder):
    text = (model_folder / "README.md").read_text()
    assert 'pipeline("image-classification", model="user/diverse-vit-tiny")' in text
    assert "trust_remote_code" not in text and "no remote code" in text
    for name in DiversityConfig().diversity_dict():
        assert f"| `{name}` |" in text, name
    assert "| `patch_cosine_coef` | 0.5 |" in text and "| `attention_cosine_coef` | 0.0001 |" in text
    assert "| embedding | patch cos, last block" in text and "| weights | Q/K/V condition number" in text
    for name in PLOT_FILES.values():
        assert f"]({name})" in text
    assert "Chen, Tianlong and Zhang, Zhenyu and Cheng, Yu and Awadallah, Ahmed and Wang, Zhangyang" in text
    assert "2203.06345" in text and "CVPR" in text and "@inproceedings" in text
    assert "| Top-1 accuracy | 0.7500 |" in text
    assert "| `num_train_epochs` |" in text and "| Labels (5) |" in text


def test_card_never_contains_local_paths_or_tokens(model_folder):
    text = (model_folder / "README.md").read_text()
    assert TOKEN not in text and str(model_folder) not in text and str(model_folder.parent) not in text
    assert str(Path.home()) + "/" not in text and "output_dir" not in text
    for bad in ("see /home/alice/run for details", "saved in /tmp/x/model", "C:\\Users\\bob\\model", TOKEN):
        with pytest.raises(ValueError, match=r"path|token"):
            check_card_is_safe("---\nlibrary_name: transformers\n---\n" + bad)
    with pytest.raises(ValueError, match="access token"):
        check_card_is_safe("my token is abc123secret", token="abc123secret")
    leaky = CardInputs(dataset_name="MNIST", dataset_description=f"Images from {model_folder}/data.")
    with pytest.raises(ValueError, match="path"):
        card_from_folder(model_folder, "user/x", leaky)


def test_base_model_and_baseline_cards(tmp_path):
    from transformers import ViTConfig

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=3)  # fmt: skip
    card = build_model_card(config, CardInputs(base_model="facebook/deit-tiny-patch16-224"), repo_id="user/ft",
                            diversity=DiversityConfig())  # fmt: skip
    assert card.data.base_model == "facebook/deit-tiny-patch16-224"
    assert validate_card_offline(card).data.base_model == "facebook/deit-tiny-patch16-224"
    folder = make_model_folder(tmp_path / "baseline", config, baseline=True)
    loaded = ModelCard.load(folder / "README.md")
    assert "baseline" in loaded.data.tags and "without the Diverse-ViT terms" in loaded.text
    assert "batch mixing off" in loaded.text  # this fixture's baseline switches mixing off too
    # The paper's baseline keeps the DeiT recipe's Mixup/CutMix: still a baseline, and its card says so.
    paper = DiversityConfig(patch_cosine_coef=0, patch_contrastive_coef=0, attention_cosine_coef=0,
                            weight_condition_coef=0, patch_mixing_loss=False)  # fmt: skip
    card = build_model_card(config, repo_id="user/b", diversity=paper)
    assert "baseline" in card.data.tags and "batch mixing on (Mixup/CutMix)" in card.text
    assert "baseline" not in build_model_card(config, repo_id="user/d", diversity=DiversityConfig()).data.tags
    with pytest.raises(ValueError, match="model_type vit, deit, vit_msn"):
        build_model_card(ResNetConfig(), repo_id="user/r")
    with pytest.raises(ValueError, match="namespace/name"):
        build_model_card(config, repo_id="no-namespace")


def test_local_base_model_is_named_without_its_path(tmp_path):
    from transformers import ViTConfig

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=3)  # fmt: skip
    card = build_model_card(config, CardInputs(base_model_name="deit-small-local"), diversity=DiversityConfig())
    assert card.data.base_model is None  # metadata holds Hub ids only
    assert "a local checkpoint, `deit-small-local`" in card.text and "trained from scratch" not in card.text


def test_trainer_writes_and_pushes_the_project_card(tmp_path, monkeypatch):
    """DiverseTrainer.create_model_card writes this project's card (not the stock Trainer's), and push_to_hub uploads
    the folder through hub.push_model_folder in one commit."""
    from transformers import ViTConfig

    import diverse_vit_hf.hub.model_card as hub
    from diverse_vit_hf import DiverseTrainer
    from diverse_vit_hf.data.image_datasets import collate_image_batch

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=16, patch_size=4, num_labels=3)  # fmt: skip
    args = DiverseTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                                    hub_model_id="user/diverse-tiny", hub_token=TOKEN)  # fmt: skip
    trainer = DiverseTrainer(model=DiverseViTForImageClassification(config), args=args,
                             data_collator=collate_image_batch)  # fmt: skip
    trainer.card_inputs = CardInputs(dataset_name="MNIST", base_model="facebook/deit-tiny-patch16-224")
    trainer.save_model()
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(args.output_dir)
    trainer.create_model_card()
    card = validate_card_offline(tmp_path / "out" / "README.md")
    assert "diverse-vit" in card.data.tags and card.data.base_model == "facebook/deit-tiny-patch16-224"
    assert "patch_cosine_coef" in card.text and TOKEN not in card.text

    pushed = {}
    monkeypatch.setattr(hub, "push_model_folder", lambda folder, **kwargs: pushed.update(folder=folder, **kwargs))
    trainer.hub_model_id = "user/diverse-tiny"  # what init_hf_repo sets (it needs the Hub)
    trainer.push_to_hub(commit_message="final")
    assert pushed["folder"] == args.output_dir and pushed["repo_id"] == "user/diverse-tiny"
    assert pushed["commit_message"] == "final" and pushed["token"] == TOKEN


def test_offline_validation_rejects_malformed_metadata():
    malformed = (
        "---\nlibrary_name: transformers\npipeline_tag: image-classification\ntags: [diverse-vit]\nmodel-index:\n"
        "- name: x\n  results:\n  - task: {type: image-classification}\n    metrics: [{type: accuracy, value: 0.5}]\n"
        "---\n# card\n"
    )
    with pytest.raises(ValueError, match="invalid"):
        validate_card_offline(malformed)
    with pytest.raises(ValueError, match="pipeline_tag"):
        validate_card_offline("---\nlibrary_name: transformers\ntags: [diverse-vit]\n---\n# card\n")


VANILLA_PIPELINE = r"""
import json, sys
import numpy as np
from PIL import Image
from transformers import pipeline
classify = pipeline("image-classification", model=sys.argv[1])
image = Image.fromarray((np.random.RandomState(0).rand(28, 28) * 255).astype("uint8"), mode="L").convert("RGB")
scores = classify(image, top_k=5)
print(json.dumps({"labels": sorted(s["label"] for s in scores), "total": sum(s["score"] for s in scores),
                  "imported_ours": any(name.startswith("diverse_vit_hf") for name in sys.modules)}))
"""


def test_saved_folder_with_card_loads_in_a_vanilla_pipeline(model_folder):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", VANILLA_PIPELINE, str(model_folder)], env=env, capture_output=True,
                         text=True, timeout=300, cwd=model_folder.parent)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["labels"] == ["0", "1", "2", "3", "4"]
    assert result["total"] == pytest.approx(1.0, abs=1e-4)
    assert result["imported_ours"] is False


def test_model_card_has_no_token_and_no_local_path(tmp_path):
    output = tmp_path / "run"
    args = make_args(output, logging_steps=1, learning_rate=1e-2, max_steps=1, hub_token=SECRET)
    trainer = build_trainer(args)
    trainer.train()
    trainer.save_model()
    card = str(card_from_folder(output, repo_id="someone/diverse-vit-test"))
    assert SECRET not in card
    assert str(tmp_path) not in card and str(Path.home()) not in card
    assert not re.search(r"/(tmp|home|work|root)/", card)


# ------------------------------------------------------------------------------------------------ upload


class FakeHub(ThreadingHTTPServer):
    """A local stand-in for the Hub's upload API that records every request (method, path, headers, body)."""

    def __init__(self, fail_commit: bool = False):
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.fail_commit = fail_commit
        self.requests: list[dict] = []
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"

    def paths(self, method: str = "POST") -> list[str]:
        return [r["path"] for r in self.requests if r["method"] == method]

    def commits(self) -> list[list[dict]]:
        bodies = [r["body"] for r in self.requests if "/commit/" in r["path"]]
        return [[json.loads(line) for line in body.decode().splitlines() if line] for body in bodies]


class FakeHubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):  # keep test output clean
        pass

    def reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers), "body": b""})
        self.reply(404, {"error": "not found"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.split("?")[0]
        self.server.requests.append({"method": "POST", "path": path, "headers": dict(self.headers), "body": body})
        if path == "/api/repos/create":
            payload = json.loads(body)
            self.reply(200, {"url": f"{self.server.endpoint}/{payload['organization']}/{payload['name']}"})
        elif path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            try:
                validate_card_offline(content)
            except ValueError as error:
                self.reply(400, {"errors": [{"message": str(error)}]})
            else:
                self.reply(200, {"errors": [], "warnings": []})
        elif match := re.fullmatch(r"/api/models/(.+)/preupload/main", path):
            files = json.loads(body)["files"]
            self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in files]})  # fmt: skip
        elif match := re.fullmatch(r"/api/models/(.+)/commit/main", path):
            if self.server.fail_commit:
                self.reply(500, {"error": "storage unavailable"})
            else:
                oid = "a" * 40
                self.reply(
                    200, {"commitUrl": f"{self.server.endpoint}/{match.group(1)}/commit/{oid}", "commitOid": oid}
                )
        else:
            self.reply(404, {"error": f"unexpected {path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the endpoint is local
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def committed_files(commit: list[dict]) -> dict[str, bytes]:
    files = {}
    for entry in commit:
        if entry["key"] == "file":
            assert entry["value"]["encoding"] == "base64"
            files[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
    return files


def test_push_uploads_every_file_in_exactly_one_commit(model_folder, fake_hub):
    info = push_model_folder(model_folder, "user/diverse-vit-tiny", endpoint=fake_hub.endpoint, token=TOKEN)
    assert info.oid == "a" * 40 and info.commit_url.startswith(fake_hub.endpoint)
    commits = fake_hub.commits()
    assert len(commits) == 1
    header = commits[0][0]
    assert header["key"] == "header" and header["value"]["summary"].startswith("Upload Diverse-ViT model")
    files = committed_files(commits[0])
    assert set(files) == EXPECTED_FILES == set(files_to_push(model_folder))
    for name, content in files.items():
        assert content == (model_folder / name).read_bytes(), name
    posts = fake_hub.paths()
    assert posts[0] == "/api/repos/create" and "/api/validate-yaml" in posts  # the Hub-side card validation
    validated = next(r for r in fake_hub.requests if r["path"] == "/api/validate-yaml")
    assert json.loads(validated["body"])["content"] == (model_folder / "README.md").read_text()
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in fake_hub.requests)
    assert "training_args.json" not in files and not any(name.endswith((".bin", ".pt")) for name in files)


def test_cli_push_regenerates_the_card_and_never_prints_the_token(
    model_folder, fake_hub, tmp_path, monkeypatch, capsys
):
    folder = shutil.copytree(model_folder, tmp_path / "copy")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    status = cli_main(["push", "--model_dir", str(folder), "--repo_id", "org/other-name", "--endpoint",
                       fake_hub.endpoint, "--private"])  # fmt: skip
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert TOKEN not in captured.out + captured.err
    assert len(fake_hub.commits()) == 1
    create = json.loads(next(r for r in fake_hub.requests if r["path"] == "/api/repos/create")["body"])
    assert create["organization"] == "org" and create["name"] == "other-name" and create["visibility"] == "private"
    card = committed_files(fake_hub.commits()[0])["README.md"].decode()
    assert f"{fake_hub.endpoint}/org/other-name/resolve/main/examples/held-out_digit_1.png" in card
    assert 'model="org/other-name"' in card and TOKEN not in card and str(tmp_path) not in card


def test_push_failure_is_reported_not_faked(model_folder, fake_hub, capsys):
    fake_hub.fail_commit = True
    with pytest.raises(HfHubHTTPError):
        push_model_folder(model_folder, "user/diverse-vit-tiny", endpoint=fake_hub.endpoint, token=TOKEN)
    status = cli_main(["push", "--model_dir", str(model_folder), "--repo_id", "user/diverse-vit-tiny", "--endpoint",
                       fake_hub.endpoint, "--token", TOKEN, "--keep_card"])  # fmt: skip
    captured = capsys.readouterr()
    assert status != 0 and "Pushed" not in captured.out and TOKEN not in captured.out + captured.err


class RecordingApi:
    """HfApi boundary double: records the calls the push makes."""

    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def create_commit(self, **kwargs):
        self.calls.append(("create_commit", kwargs))
        return "commit-info"


def test_push_at_the_hfapi_boundary(model_folder, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    api = RecordingApi()
    assert push_model_folder(model_folder, "user/x", api=api, private=True) == "commit-info"
    assert [name for name, _ in api.calls] == ["create_repo", "create_commit"]
    assert api.calls[0][1] == {"repo_id": "user/x", "private": True, "exist_ok": True, "repo_type": "model"}
    commit = api.calls[1][1]
    assert {op.path_in_repo for op in commit["operations"]} == EXPECTED_FILES
    assert all(Path(op.path_or_fileobj).is_file() for op in commit["operations"])


def test_push_bad_input(model_folder, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        push_model_folder(model_folder, "user/x", api=RecordingApi())  # conftest sets offline mode
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ValueError, match="namespace/name"):
        push_model_folder(model_folder, "no-namespace", api=RecordingApi())
    partial = shutil.copytree(model_folder, tmp_path / "partial")
    (partial / "model.safetensors").unlink()
    (partial / "README.md").unlink()
    with pytest.raises(ValueError, match=r"README\.md.*model\.safetensors"):
        push_model_folder(partial, "user/x", api=RecordingApi())
    with pytest.raises(ValueError, match="does not exist"):
        files_to_push(tmp_path / "missing")
    assert cli_main(["push", "--model_dir", str(tmp_path / "missing"), "--repo_id", "user/x"]) == 2


def test_cli_card_writes_a_valid_card(model_folder, tmp_path, capsys):
    folder = shutil.copytree(model_folder, tmp_path / "card")
    (folder / "README.md").unlink()
    status = cli_main(["card", "--model_dir", str(folder), "--repo_id", "user/y", "--base_model", "google/vit-base"])
    assert status == 0, capsys.readouterr().err
    card = validate_card_offline(folder / "README.md")
    assert card.data.base_model == "google/vit-base" and card.data.datasets == ["ylecun/mnist"]
