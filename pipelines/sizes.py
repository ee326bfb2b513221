"""The sizes stage: what each store option of a teacher takes for a training set of a given size, before any data,
checkpoint or work exists (``kdcache sizes``)."""

from __future__ import annotations

from typing import Sequence

import torch

from kdcache.models import build_model, feature_dim, map_shape, model_info
from kdcache.store.form import every_form
from kdcache.store.layout import StoreShape
from kdcache.store.sizes import StoreSize, store_size


def teacher_store_sizes(teacher: str, num_classes: int, n_samples: int, views: int, image_size: int,
                        ks: Sequence[int]) -> list[StoreSize]:
    """Every store form of ``teacher`` (its shapes only: built on the meta device, no weights) over ``views``
    views of ``n_samples`` rows of ``num_classes`` classes, at ``image_size`` pixels."""
    model_info(teacher)   # an unknown architecture is one line
    with torch.device("meta"):
        model = build_model(teacher, num_classes)
    shape = StoreShape(views, n_samples, num_classes, feature_dim(model), map_shape(model, image_size))
    return [store_size(form, shape) for form in every_form([k for k in ks if k <= num_classes])]
