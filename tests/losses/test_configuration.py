"""`diverse_vit_hf.losses.configuration.DiversityConfig`: the released defaults, validation of every option (with
the message naming it), the switches derived from the options, and copying the options out of other objects."""

from __future__ import annotations

from dataclasses import fields
from types import SimpleNamespace

import pytest

from diverse_vit_hf.losses.configuration import DIVERSITY_COEFFICIENTS, DiversityConfig


def test_the_defaults_are_the_released_objective():
    config = DiversityConfig()
    coefficients = {name: getattr(config, name) for name in DIVERSITY_COEFFICIENTS}
    assert coefficients == {
        "patch_cosine_coef": 0.5,
        "patch_contrastive_coef": 0.5,
        "attention_cosine_coef": 1e-4,
        "weight_condition_coef": 5e-4,
    }
    assert (config.weight_estimator, config.power_iterations, config.power_persistent) == ("power", 1, False)
    assert config.mixing and config.patch_mixing_loss and config.patch_cosine_variant == "signed"


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        (
            "patch_contrastive_coef",
            -1.0,
            r"`patch_contrastive_coef` must be a finite number >= 0.*released setting is 0.5",
        ),
        ("weight_condition_coef", float("inf"), "`weight_condition_coef` must be a finite number"),
        ("attention_cosine_coef", "1e-4", "`attention_cosine_coef` must be a finite number"),
        ("patch_cosine_variant", "absolute", "`patch_cosine_variant` must be one of"),
        ("weight_estimator", "lanczos", "`weight_estimator` must be one of"),
        ("power_iterations", 1.5, "`power_iterations` must be an integer >= 1"),
        ("mixup_alpha", -0.1, "`mixup_alpha` must be a finite number >= 0"),
        ("cutmix_alpha", float("nan"), "`cutmix_alpha` must be a finite number >= 0"),
        ("mix_switch_prob", -0.5, r"`mix_switch_prob` is a probability and must lie in \[0, 1\]"),
        ("mix_prob", 1.01, r"`mix_prob` is a probability"),
    ],
)
def test_every_invalid_option_is_refused_with_its_name(field, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        DiversityConfig(**{field: value})


def test_the_derived_switches():
    plain = DiversityConfig(mixing=False, patch_mixing_loss=False, **dict.fromkeys(DIVERSITY_COEFFICIENTS, 0.0))
    assert plain.is_plain_baseline and plain.is_paper_baseline
    assert not (plain.regularizers_enabled or plain.mixing_enabled or plain.needs_diversity_outputs)

    paper_baseline = DiversityConfig(patch_mixing_loss=False, **dict.fromkeys(DIVERSITY_COEFFICIENTS, 0.0))
    assert paper_baseline.mixing_enabled and paper_baseline.is_paper_baseline
    assert not paper_baseline.is_plain_baseline and not paper_baseline.needs_diversity_outputs

    one_term = DiversityConfig(mixing=False, patch_mixing_loss=False, **(dict.fromkeys(DIVERSITY_COEFFICIENTS, 0.0)
                               | {"attention_cosine_coef": 1e-4}))  # fmt: skip
    assert one_term.regularizers_enabled and one_term.needs_diversity_outputs and not one_term.is_paper_baseline

    patch_loss_only = DiversityConfig(mixing=False, **dict.fromkeys(DIVERSITY_COEFFICIENTS, 0.0))
    assert patch_loss_only.needs_diversity_outputs and not patch_loss_only.regularizers_enabled
    # Mixing is off when nothing can mix: no probability, or neither Mixup nor CutMix.
    assert not DiversityConfig(mix_prob=0.0).mixing_enabled
    assert not DiversityConfig(mixup_alpha=0.0, cutmix_alpha=0.0).mixing_enabled
    assert DiversityConfig(mixup_alpha=0.0).mixing_enabled


def test_options_are_copied_from_a_dict_or_an_object_and_nothing_else():
    names = [f.name for f in fields(DiversityConfig)]
    config = DiversityConfig(patch_cosine_coef=0.25, mixing=False, weight_estimator="exact")
    assert list(config.diversity_dict()) == names
    assert DiversityConfig.from_object(config.diversity_dict() | {"learning_rate": 1.0}) == config
    carrier = SimpleNamespace(**config.diversity_dict(), output_dir="x")
    assert DiversityConfig.from_object(carrier) == config
    partial = DiversityConfig.from_object({"attention_cosine_coef": 0.0})  # missing options keep their defaults
    assert partial == DiversityConfig(attention_cosine_coef=0.0)
    with pytest.raises(ValueError, match="patch_cosine_coef"):  # validated like a new config
        DiversityConfig.from_object({"patch_cosine_coef": -1})
