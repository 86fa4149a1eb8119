"""Self-supervised pretraining of a ViT backbone: one file per method, one shared driver.

``build_method(name, backbone)`` gives the method; ``vitrina.ssl.common.pretrain`` trains it on the
shared loop and saves the backbone as a plain ViT checkpoint.
"""

from __future__ import annotations

from vitrina.errors import UserError
from vitrina.models.vit import ViT
from vitrina.ssl.byol import BYOL
from vitrina.ssl.colorization import Colorization
from vitrina.ssl.common import SSLMethod
from vitrina.ssl.deepcluster import DeepCluster
from vitrina.ssl.dino import DINO
from vitrina.ssl.inpainting import Inpainting
from vitrina.ssl.jigsaw import Jigsaw
from vitrina.ssl.mae import MAE
from vitrina.ssl.relative_position import RelativePosition
from vitrina.ssl.rotation import Rotation
from vitrina.ssl.simclr import SimCLR
from vitrina.ssl.vicreg import VICReg

METHODS: dict[str, type[SSLMethod]] = {
    m.name: m
    for m in (
        Rotation,
        Jigsaw,
        RelativePosition,
        Inpainting,
        Colorization,
        SimCLR,
        DeepCluster,
        MAE,
        VICReg,
        BYOL,
        DINO,
    )
}


def build_method(name: str, backbone: ViT, **options) -> SSLMethod:
    """The method ``name`` around ``backbone``; ``options`` go to its constructor (e.g. ``config=``)."""
    if name not in METHODS:
        raise UserError(f"unknown self-supervised method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name](backbone, **options)


__all__ = ["METHODS", "SSLMethod", "build_method"]
