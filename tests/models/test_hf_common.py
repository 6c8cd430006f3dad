"""transformers' own model test suite, `ModelTesterMixin` of the installed version, on the diversified classes.

What every transformers model must pass (save/load round trips, hidden states and attention outputs, training,
gradient checkpointing, torch.export, weight initialisation, ...), run against every diversified class (ViT,
DeiT, ViT-MSN, DINOv2, DINOv2 with registers, BEiT, I-JEPA) as HF runs it against the stock classes. The suite
comes from the transformers source distribution (`tests/fixtures/fetch_hf_model_tests.py`, run by `make test`);
without it this module is skipped, except under CI, where it must run.
"""

from __future__ import annotations

import os
import sys
import unittest
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import transformers
from fixtures.fetch_hf_model_tests import fetch, fetched_version
from fixtures.scripts import REPO
from torch import nn
from transformers import (
    BeitConfig,
    DeiTConfig,
    Dinov2Config,
    Dinov2WithRegistersConfig,
    IJepaConfig,
    ViTConfig,
    ViTMSNConfig,
)
from transformers.testing_utils import torch_device

from diverse_vit_hf import (
    DiverseBeitForImageClassification,
    DiverseDeiTForImageClassification,
    DiverseDinov2ForImageClassification,
    DiverseDinov2WithRegistersForImageClassification,
    DiverseIJepaForImageClassification,
    DiverseViTForImageClassification,
    DiverseViTMSNForImageClassification,
)

HF_MODEL_TESTS = Path(os.environ.get("DIVERSE_VIT_HF_MODEL_TESTS", REPO / ".venv" / "hf-model-tests"))
if fetched_version(HF_MODEL_TESTS) != transformers.__version__:
    if not os.environ.get("CI"):
        pytest.skip(
            f"transformers {transformers.__version__}'s model tests are not in {HF_MODEL_TESTS}: run `make test` or "
            f"`python tests/fixtures/fetch_hf_model_tests.py {HF_MODEL_TESTS}`",
            allow_module_level=True,
        )
    fetch(HF_MODEL_TESTS)  # CI must run them: fetch here if the Makefile did not
sys.path.insert(0, str(HF_MODEL_TESTS))
from hf_model_tests.test_modeling_common import ModelTesterMixin, floats_tensor  # noqa: E402


class DiverseModelTester:
    """Tiny configs and inputs in the shape ModelTesterMixin expects (HF's ViT tester has the same fields)."""

    def __init__(
        self, parent: unittest.TestCase, config_class: type, num_prefix_tokens: int, config_kwargs: dict | None = None
    ) -> None:
        self.parent = parent
        self.config_class = config_class
        self.config_kwargs = config_kwargs or {}
        self.batch_size = 5
        self.num_channels = 3
        self.image_size = 16
        self.patch_size = 4
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.num_labels = 3
        self.is_training = True
        self.seq_length = (self.image_size // self.patch_size) ** 2 + num_prefix_tokens

    def get_config(self):
        kwargs = {
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": 37,
            "num_labels": self.num_labels,
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "encoder_stride": 2,
        }
        return self.config_class(**(kwargs | self.config_kwargs))

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), {"pixel_values": pixel_values}


class _DiverseModelTest(ModelTesterMixin):
    config_class: type
    num_prefix_tokens: int
    config_kwargs: ClassVar[dict] = {}
    test_resize_embeddings = False  # patch embeddings are a convolution: there is no vocabulary to resize

    def setUp(self) -> None:
        self.model_tester = DiverseModelTester(self, self.config_class, self.num_prefix_tokens, self.config_kwargs)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # The mixin adds labels by looking the class name up in the auto mappings, which know only the stock names.
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            inputs_dict["labels"] = torch.zeros(self.model_tester.batch_size, dtype=torch.long, device=torch_device)
        return inputs_dict

    def test_model_get_set_embeddings(self):
        # As HF's ViT test: the input embeddings are the patch embedding module, there are no output embeddings.
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), nn.Module)
            output = model.get_output_embeddings()
            self.assertTrue(output is None or isinstance(output, nn.Linear))


class DiverseViTModelTest(_DiverseModelTest, unittest.TestCase):
    all_model_classes = (DiverseViTForImageClassification,)
    config_class = ViTConfig
    num_prefix_tokens = 1


class DiverseDeiTModelTest(_DiverseModelTest, unittest.TestCase):
    all_model_classes = (DiverseDeiTForImageClassification,)
    config_class = DeiTConfig
    num_prefix_tokens = 2  # CLS + distillation token


class DiverseViTMSNModelTest(_DiverseModelTest, unittest.TestCase):
    all_model_classes = (DiverseViTMSNForImageClassification,)
    config_class = ViTMSNConfig
    num_prefix_tokens = 1


class DiverseDinov2ModelTest(_DiverseModelTest, unittest.TestCase):
    all_model_classes = (DiverseDinov2ForImageClassification,)
    config_class = Dinov2Config
    num_prefix_tokens = 1
    # mask_token is read only by masked image modeling, never by the classification forward (stock or ours), so
    # the gradient-checkpointing tests' "every parameter has a gradient" would fail on the stock class too.
    config_kwargs: ClassVar[dict] = {"mlp_ratio": 2, "layerscale_value": 0.5, "use_mask_token": False}


class DiverseDinov2WithRegistersModelTest(_DiverseModelTest, unittest.TestCase):
    all_model_classes = (DiverseDinov2WithRegistersForImageClassification,)
    config_class = Dinov2WithRegistersConfig
    num_prefix_tokens = 3  # CLS + 2 registers
    config_kwargs: ClassVar[dict] = {"mlp_ratio": 2, "layerscale_value": 0.5, "num_register_tokens": 2}
    # Its embeddings always hold a mask_token (no config switch), which only masked image modeling reads.
    test_all_params_have_gradient = False


class DiverseBeitModelTest(_DiverseModelTest, unittest.TestCase):
    all_model_classes = (DiverseBeitForImageClassification,)
    config_class = BeitConfig
    num_prefix_tokens = 1
    config_kwargs: ClassVar[dict] = {
        "use_relative_position_bias": True,
        "use_mean_pooling": True,
        "layer_scale_init_value": 0.1,
    }


class DiverseIJepaModelTest(_DiverseModelTest, unittest.TestCase):
    all_model_classes = (DiverseIJepaForImageClassification,)
    config_class = IJepaConfig
    num_prefix_tokens = 0  # no CLS token: the head mean-pools all tokens
