"""The eval stage: top-1 / top-5 of a checkpoint on a data set's test split."""

from __future__ import annotations

from pathlib import Path

from kdcache.data import load_dataset
from kdcache.device import resolve_device
from kdcache.errors import CheckpointError, KdcacheError
from kdcache.evaluate import evaluate
from kdcache.models import build_model, load_checkpoint, map_shape, model_info


def evaluate_checkpoint(arch: str, checkpoint: Path, dataset: str, data_root: Path | None = None,
                        device: str | None = None, batch_size: int = 256, recipe: str | None = None,
                        image_size: int | None = None) -> tuple[float, float]:
    """Load ``checkpoint`` into ``arch`` and return its (top-1, top-5) in percent on the test split, viewed as
    ``recipe`` at ``image_size`` prescribes (default: the data set's)."""
    model_info(arch)
    if batch_size < 1:
        raise KdcacheError(f"--batch-size must be at least 1 (got {batch_size})")
    if not Path(checkpoint).is_file():
        raise CheckpointError(f"checkpoint {checkpoint} not found")
    data = load_dataset(dataset, data_root, recipe, image_size)
    dev = resolve_device(device)
    model = build_model(arch, data.num_classes)
    map_shape(model, data.image_size)  # a model that cannot take the views: one line, before any work
    load_checkpoint(model, checkpoint)
    return evaluate(model.to(dev), data, data.recipe, dev, batch_size)
