"""abnn: Adaptive Batch Normalization Networks (Lo & Patel) with honest attacks and evaluation.

    from abnn import ABNN
    from abnn.models import resnet18_cifar, vgg19_bn_substitute
    from abnn.attacks import PGD

    model = ABNN(resnet18_cifar(), vgg19_bn_substitute(weights="substitute/model.pt"))
    x_adv = PGD(model, eps=8/255, alpha=2/255, steps=5)(x, y)
"""

__version__ = "0.1.0"

from .errors import AbnnError, CheckpointError, DataNotFoundError  # noqa: E402
from .framework import ABNN  # noqa: E402
from .layers import AdaptiveBatchNorm2d, AdaptiveBatchNorm3d  # noqa: E402

__all__ = ["ABNN", "AdaptiveBatchNorm2d", "AdaptiveBatchNorm3d", "AbnnError", "CheckpointError",
           "DataNotFoundError", "__version__"]
