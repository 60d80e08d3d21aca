"""The built-in attacks of the registry, registered when :mod:`abnn.attacks` is imported.

Each entry names an attack class of this package and states only what differs from the class's
keyword defaults (see :mod:`abnn.attacks.registry`): the video defaults of METHOD.md s. 4, fixed
options, and for transfer and protocol attacks how the model they craft on is made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..framework import replace_adaptive_with_bn
from .adaptive import StatisticsAttack, Transfer
from .apgd import APGD, APGDT
from .autoattack import AutoAttack
from .base import Attack, AttackOptionError, UnsupportedModelError
from .official import OfficialAutoAttack
from .pgd import PGD
from .protocols import ProtocolAttack
from .registry import BLACK_BOX, ENSEMBLE, PROTOCOL, TRANSFER, AttackEntry, EpsRatio, build_attack, register
from .roa import ROA
from .square import Square

__all__: list[str] = []  # nothing to import: importing the module registers the entries



def _build_transfer(model: nn.Module, *, video: bool, source: nn.Module | None = None, attack: str = "pgd",
                    seed: int | None = None, channels_last: bool | None = None, amp: Any = None,
                    **options: Any) -> Attack:
    if not isinstance(source, nn.Module):
        raise AttackOptionError("the transfer attack needs a source model: source=<nn.Module> in Python, "
                                "--source [NAME=]RUN on the command line")
    inner = build_attack(attack, source, video=video, seed=seed, channels_last=channels_last, amp=amp, **options)
    out = Transfer(model, source=source, attack=lambda src: inner, seed=seed)
    out.attack = attack
    return out


def _build_transfer_bn(model: nn.Module, *, video: bool, **options: Any) -> Attack:
    if not hasattr(model, "adaptive") or not hasattr(model, "target_stages"):
        raise UnsupportedModelError(f"transfer-bn transfers from an ABNN's target with plain BatchNorm; "
                                    f"{type(model).__name__} has no adaptive layers (use transfer with --source)")
    source = replace_adaptive_with_bn(model).eval()
    return _build_transfer(model, video=video, source=source, **options)


def _protocol_builder(protocol: str) -> Callable[..., Attack]:
    def build(model: nn.Module, *, video: bool, source: Any = None, **options: Any) -> Attack:
        if source is not None:
            raise AttackOptionError(f"protocol {protocol} attacks the model itself; it takes no source")
        return ProtocolAttack(model, protocol=protocol, **options)
    return build


#: (registry name, protocol of abnn.framework.PROTOCOLS, summary)
_PROTOCOL_ENTRIES = (
    ("pgd-target-only", "target-only", "PGD with the substitute's features held constant (mu_s, sigma_s, gamma_s, "
     "beta_s detached; paper s. 3.1 'the adversary focuses more on the target model')"),
    ("pgd-no-encoder-grad", "no-encoder-grad", "PGD with only the AdaIN encoder outputs (gamma_s, beta_s) detached"),
    ("pgd-no-stats-grad", "no-stats-grad", "PGD with only the substitute moments (mu_s, sigma_s) detached"),
    ("pgd-clean-substitute", "clean-substitute", "PGD with the substitute fed the clean image while crafting"),
    ("pgd-train-bn", "train-bn", "PGD with the target's BatchNorm on batch statistics while crafting"),
    ("pgd-typeA-detach", "typeA-detach", "PGD with the substitute's type-A shortcuts detached (the authors' code)"),
)

_VIDEO_PGD = {"eps": 1 / 255, "alpha": EpsRatio(4)}

for _entry in (
    AttackEntry("pgd", PGD, "L-inf PGD, cross-entropy (Madry et al., ICLR 2018); the paper's attack", video=_VIDEO_PGD),
    AttackEntry("apgd-ce", APGD, "Auto-PGD on the cross-entropy (Croce & Hein, ICML 2020)", fixed={"loss": "ce"}),
    AttackEntry("apgd-dlr", APGD, "Auto-PGD on the DLR loss (Croce & Hein, ICML 2020); needs >= 3 classes",
                fixed={"loss": "dlr"}),
    AttackEntry("apgd-t", APGDT, "targeted Auto-PGD, targeted DLR loss (Croce & Hein, ICML 2020); needs >= 4 classes"),
    AttackEntry("square", Square, "Square Attack, gradient-free random search (Andriushchenko et al., ECCV 2020)",
                kind=BLACK_BOX),
    AttackEntry("roa", ROA, "rectangular occlusion sticker (Wu, Tong & Vorobeychik, ICLR 2020); the paper's s. 3.2",
                norm=None, video={}),
    AttackEntry("stats", StatisticsAttack, "PGD on CE + weight x shift of the substitute's statistics "
                "(adaptive attack, Croce et al., ICML 2022)", video=_VIDEO_PGD, requires="an ABNN model"),
    AttackEntry("transfer-bn", Transfer, "transfer from the ABNN target with plain BatchNorm (Athalye et al., 2018)",
                kind=TRANSFER, inner=True, builder=_build_transfer_bn, requires="an ABNN model"),
    AttackEntry("transfer", Transfer, "transfer from another model (Carlini et al. 2019, s. 4)", kind=TRANSFER,
                inner=True, builder=_build_transfer, requires="source=NAME of a --source [NAME=]RUN"),
    AttackEntry("autoattack", AutoAttack, "AutoAttack-style ensemble: APGD-CE, APGD-T, APGD-DLR (in FAB-T's "
                "place), Square, sample-wise worst case (ours)", kind=ENSEMBLE),
    AttackEntry("autoattack-official", OfficialAutoAttack, "the authors' AutoAttack, standard version: APGD-CE, "
                "APGD-T, FAB-T, Square (Croce & Hein, ICML 2020)", kind=ENSEMBLE, images_only=True,
                requires="pip install -e '.[autoattack]'"),
):
    register(_entry)

for _name, _protocol, _summary in _PROTOCOL_ENTRIES:
    register(AttackEntry(_name, ProtocolAttack, _summary + "; scored on the unmodified model", kind=PROTOCOL,
                         inner=True, builder=_protocol_builder(_protocol), defaults={"attack": "pgd"},
                         requires="an ABNN model" + (" whose substitute has type-A shortcuts"
                                                     if _protocol == "typeA-detach" else "")))
