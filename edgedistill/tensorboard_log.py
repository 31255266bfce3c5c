"""TensorBoard scalars beside a training stage's ``log.jsonl``, when the recipe sets ``train.log: [tensorboard]``.

Each epoch's log row becomes scalars at step = epoch (1-based, as in log.jsonl), in ``RUN/<stage>/tb/``
(``student/tb``, ``baseline/tb``, ``teacher/tb`` for a fine-tuned teacher): ``loss/total`` and ``loss/<term>`` for
each weighted loss term, ``train/lr``, ``train/images_per_s``, ``train/epoch_seconds`` and, with
``train.eval_every``, ``val/top1``. Only the main process writes. TensorBoard is optional: ``check_tensorboard``
fails before any work when the recipe asks for it and it is not installed.
"""
from pathlib import Path

from . import distributed

INSTALL = "pip install tensorboard"
NAMED = {"loss": "loss/total", "lr": "train/lr", "images_per_s": "train/images_per_s",
         "seconds": "train/epoch_seconds", "val_top1": "val/top1"}
NOT_SCALARS = ("epoch", "steps", "images")  # bookkeeping in a log row, not curves


def check_tensorboard(train_cfg):
    """Raise the install command when ``train.log`` asks for TensorBoard and it cannot be imported."""
    if "tensorboard" not in getattr(train_cfg, "log", ()):
        return
    try:
        import tensorboard  # noqa: F401
    except ImportError as e:
        raise ImportError(f"Recipe key 'train.log' asks for TensorBoard, which is not installed: {INSTALL}") from e


def tag(key: str) -> str:
    return NAMED.get(key, f"loss/{key}")  # any other number in a row is a loss term (ce, kd, feature_l2, ...)


class ScalarLog:
    """Writes log rows to TensorBoard, or (``train.log`` without tensorboard, or not the main process) nothing."""

    def __init__(self, train_cfg, out_dir):
        self.writer = None
        if "tensorboard" in getattr(train_cfg, "log", ()) and distributed.is_main():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tb"))

    def add_row(self, row: dict):
        if self.writer is None:
            return
        for key, value in row.items():
            if key not in NOT_SCALARS and isinstance(value, (int, float)):
                self.writer.add_scalar(tag(key), value, global_step=row["epoch"])
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
