from mbbo.data.binary import (
    add_bias_column,
    make_imbalanced_noisy,
    temperatures,
    train_validation_split,
)
from mbbo.data.cache import cache_dir, fetch, sha256_file
from mbbo.data.errors import DataError
from mbbo.data.libsvm import BinaryDataset, available_datasets, load_binary_dataset, load_libsvm_file

__all__ = [
    "BinaryDataset",
    "DataError",
    "add_bias_column",
    "available_datasets",
    "cache_dir",
    "fetch",
    "load_binary_dataset",
    "load_libsvm_file",
    "make_imbalanced_noisy",
    "sha256_file",
    "temperatures",
    "train_validation_split",
]
