"""Task data: task batches and task distributions (no Pyro here)."""

from bayesmeta.data._common import ClassSplit
from bayesmeta.data.augment import RandomAffine, affine_images
from bayesmeta.data.fewshot import FewShotClassification, TaskIndices
from bayesmeta.data.images import ImageFolderTasks, folder_image, load_image_folder
from bayesmeta.data.omniglot import Omniglot, omniglot_image, packaged_omniglot_root
from bayesmeta.data.sinusoid import Sinusoid, SinusoidParams
from bayesmeta.data.tasks import TaskBatch, TaskDistribution

__all__ = [
    "ClassSplit",
    "FewShotClassification",
    "ImageFolderTasks",
    "Omniglot",
    "RandomAffine",
    "Sinusoid",
    "SinusoidParams",
    "TaskBatch",
    "TaskDistribution",
    "TaskIndices",
    "affine_images",
    "folder_image",
    "load_image_folder",
    "omniglot_image",
    "packaged_omniglot_root",
]
