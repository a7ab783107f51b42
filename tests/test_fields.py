"""Every config field declares its meaning and its resume rule where it is declared; the resume check, the value
check and the flag table read them from there."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

from config import TRAIN_PRESETS, TrainConfig
from lowmem.checkpoint.files import write_manifest
from lowmem.checkpoint.resume import fingerprint, plan_resume
from lowmem.fields import RESUME_RULES, rules
from lowmem.run.errors import UserError


@pytest.mark.parametrize("preset", sorted(TRAIN_PRESETS))
def test_every_field_has_a_meaning_and_a_resume_rule(preset):
    meta = rules(TRAIN_PRESETS[preset])
    assert len(meta) == len(dataclasses.fields(TrainConfig))
    no_rule = [name for name, m in meta.items() if m.get("resume") not in RESUME_RULES]
    no_help = [name for name, m in meta.items() if not m.get("help")]
    assert not no_rule, f"fields without a resume rule (declare them with setting(...) in config.py): {no_rule}"
    assert not no_help, f"fields without a meaning: {no_help}"


def saved_run(tmp_path, cfg: TrainConfig, world: int = 1) -> TrainConfig:
    """A checkpoint directory as a run of `cfg` leaves it (settings only: the resume check loads no weights)."""
    step = os.path.join(cfg.checkpoint_dir(), "step_00000004")
    os.makedirs(step)
    with open(os.path.join(step, "train_state.json"), "w", encoding="utf-8") as f:
        json.dump({"step": 4, "fingerprint": fingerprint(cfg, world, 600), "config": dataclasses.asdict(cfg)}, f)
    write_manifest(step, ["train_state.json"])
    return cfg


def resume(cfg: TrainConfig, **changes):
    new = dataclasses.replace(cfg, is_keep_training=True, **changes)
    return plan_resume(new, fingerprint(new, 1, 600), log=lambda _: None)


def test_resume_rules_refuse_apply_or_ignore_each_change(tmp_path):
    cfg = saved_run(tmp_path, TrainConfig(output_dir=str(tmp_path), lora_r=8, lora_alpha=16.0))
    with pytest.raises(UserError, match=r"^resume refused: lora_alpha was 16.0, now 64.0;") as refused:
        resume(cfg, lora_alpha=64.0)
    assert "\n" not in str(refused.value)
    with pytest.raises(UserError, match="max_seq_len was 128, now 256.*--allow_config_change"):
        resume(cfg, max_seq_len=256)
    allowed = resume(cfg, max_seq_len=256, allow_config_change=True)
    assert allowed.changed == {}
    plan = resume(cfg, lora_dropout=0.1, mixed_precision="no", dropout=0.1, learn_rate=1e-4, prefetch_batches=2)
    assert plan.changed == {"lora_dropout": (0.05, 0.1), "mixed_precision": ("auto", "no"), "dropout": (0.0, 0.1),
                            "learn_rate": (0.003, 1e-4)}  # prefetch_batches is free: not compared
    assert plan.changes_optimizer


def test_a_checkpoint_missing_a_part_it_should_hold_is_unusable(tmp_path):
    from lowmem.checkpoint.files import verify

    step = tmp_path / "step_00000002"
    step.mkdir()
    for name in ("train_state.json", "rng_0.pt", "rng_1.pt"):
        (step / name).write_text("{}")
    write_manifest(str(step), ["train_state.json", "rng_0.pt", "rng_1.pt"])
    verify(str(step))
    manifest = json.loads((step / "manifest.json").read_text())
    del manifest["files"]["rng_1.pt"]  # the file and its entry both gone: what it should hold still says so
    (step / "manifest.json").write_text(json.dumps(manifest))
    (step / "rng_1.pt").unlink()
    with pytest.raises(ValueError, match="rng_1.pt is missing"):
        verify(str(step))


def test_ranges_come_from_the_fields():
    from lowmem.train.validate import check_config

    with pytest.raises(UserError, match=r"--lora_alpha=0.0 must be greater than 0"):
        check_config(TrainConfig(lora_r=8, lora_alpha=0.0))
    with pytest.raises(UserError, match=r"--learn_rate=inf must be a finite number"):
        check_config(TrainConfig(learn_rate=float("inf")))
