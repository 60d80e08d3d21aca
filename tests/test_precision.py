"""Mixed-precision training (``--amp bf16`` on the CPU): per-epoch validation stays float32."""

import json

import torch

from abnn.config import TrainConfig
from abnn.training import TrainStep, train, validation


def test_bf16_training_validates_in_float32(tmp_path, fake_data_root, monkeypatch):
    """Under --amp bf16 the training step runs in bf16 while the per-epoch clean and PGD-5
    accuracies see float32 logits (their forwards run outside the step's autocast)."""
    seen: dict[str, set] = {"train": set(), "val": set()}

    def recording(fn):
        def wrapped(model, *args, **kwargs):
            hook = model.register_forward_hook(lambda m, i, out: seen["val"].add(out.dtype))
            try:
                return fn(model, *args, **kwargs)
            finally:
                hook.remove()
        return wrapped

    monkeypatch.setattr(validation, "accuracy", recording(validation.accuracy))
    monkeypatch.setattr(validation, "robust_accuracy", recording(validation.robust_accuracy))
    real_step = TrainStep.__call__

    def step(self, x, y):
        loss, logits = real_step(self, x, y)
        seen["train"].add(logits.dtype)
        return loss, logits

    monkeypatch.setattr(TrainStep, "__call__", step)
    cfg = TrainConfig(method="standard", width=1 / 16, epochs=1, batch_size=16, val_size=8, robust_val_size=8,
                           amp="bf16", device="cpu", data_root=str(fake_data_root))
    res = train(cfg, tmp_path / "run", progress=False, max_steps=2)
    assert res.amp == "bfloat16"
    assert seen["train"] == {torch.bfloat16}
    assert seen["val"] == {torch.float32}
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val_acc"] is not None and last["val_pgd_acc"] is not None
