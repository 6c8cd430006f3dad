"""`diverse_vit_hf.trainer.optim`: DeiT's weight decay groups in `DiverseTrainer`'s optimizer: biases, every norm
weight, the position embeddings and the CLS / distillation / mask tokens are not decayed."""

from __future__ import annotations

from fixtures.builders import make_recipe_args as make_args
from fixtures.builders import make_recipe_trainer as make_trainer
from fixtures.builders import tiny_config
from transformers import DeiTConfig, ViTModel

from diverse_vit_hf import DiverseDeiTForImageClassification, DiverseTrainer


def _no_decay_names(trainer: DiverseTrainer) -> set[str]:
    trainer.create_optimizer()
    by_id = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = {
        group["weight_decay"]: {by_id[id(p)] for p in group["params"]} for group in trainer.optimizer.param_groups
    }
    assert set(groups) == {0.05, 0.0}
    return groups[0.0]


def test_weight_decay_excludes_biases_norms_position_embeddings_and_tokens(tmp_path):
    trainer = make_trainer(tmp_path, weight_decay=0.05)
    names = {n for n, _ in trainer.model.named_parameters()}
    expected = {
        n for n in names if n.endswith(".bias") or "layernorm" in n or n.endswith(("cls_token", "position_embeddings"))
    }
    assert "vit.embeddings.cls_token" in expected and "vit.embeddings.position_embeddings" in expected
    assert _no_decay_names(trainer) == expected
    decayed = names - expected
    assert all(n.endswith(".weight") and "layernorm" not in n for n in decayed) and "classifier.weight" in decayed


def test_weight_decay_excludes_the_distillation_and_mask_tokens(tmp_path):
    config = DeiTConfig(**tiny_config().to_diff_dict())
    model = DiverseDeiTForImageClassification(config)
    trainer = DiverseTrainer(model=model, args=make_args(tmp_path, weight_decay=0.05))
    no_decay = _no_decay_names(trainer)
    assert {"deit.embeddings.cls_token", "deit.embeddings.distillation_token"} <= no_decay
    assert "deit.embeddings.position_embeddings" in no_decay
    decay = trainer.get_decay_parameter_names(ViTModel(tiny_config(), use_mask_token=True))
    assert "embeddings.patch_embeddings.projection.weight" in decay
    assert not any(n.endswith(("mask_token", "cls_token", "position_embeddings")) for n in decay)
