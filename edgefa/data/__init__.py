"""Data: datasets and loaders, a stratified split, a global standardizer and a simulated sensor shift."""

from edgefa.data.datasets import (
    Dataset,
    Standardizer,
    load_cifar10_dir,
    load_dataset,
    load_digits,
    load_idx,
    load_mnist_dir,
    load_npz,
    save_npz,
    stratified_split,
)
from edgefa.data.mnist1d import load_mnist1d
from edgefa.data.shift import SensorShift, rotate_images, translate_images

__all__ = [
    "Dataset",
    "SensorShift",
    "Standardizer",
    "load_cifar10_dir",
    "load_dataset",
    "load_digits",
    "load_idx",
    "load_mnist1d",
    "load_mnist_dir",
    "load_npz",
    "rotate_images",
    "save_npz",
    "stratified_split",
    "translate_images",
]
