"""Atomic writes keep the old file on failure, leave no temporary behind, and give normal permissions."""

from __future__ import annotations

import stat

import pytest
from transformers import ViTConfig

from diverse_vit_hf import DiverseViTForImageClassification
from diverse_vit_hf.utils.fileio import atomic_write, atomic_write_text, current_umask


def test_new_file_gets_open_w_permissions(tmp_path):
    path = atomic_write_text(tmp_path / "a.json", "{}")
    assert path.read_text() == "{}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~current_umask()


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_saved_config_is_readable_by_others(tmp_path):
    config = ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
        num_labels=2,
    )
    DiverseViTForImageClassification(config).save_pretrained(tmp_path)
    mode = stat.S_IMODE((tmp_path / "config.json").stat().st_mode)
    assert mode == 0o666 & ~current_umask()
