"""scikit-learn's bundled digits as a `datasets.DatasetDict` (no download): the data of `datadiet demo` and of
`load_data("sklearn-digits")`. The command itself is `datadiet.cli.demo`."""

from __future__ import annotations

import numpy as np

__all__ = ["load_digits_dataset"]


def load_digits_dataset(test_size: float = 0.25, seed: int = 0):
    """scikit-learn's digits (1,797 8×8 grey images) as a `DatasetDict` with an `Image` column `image` and a
    `ClassLabel` column `label`, split into train/test (stratified, fixed seed).

    Example:
    ```python
    >>> from datadiet.demo import load_digits_dataset
    >>> splits = load_digits_dataset()
    >>> len(splits["train"]), len(splits["test"])
    (1347, 450)

    ```
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = [PILImage.fromarray((image * (255 / 16)).round().astype(np.uint8), mode="L") for image in digits.images]
    train_idx, test_idx = train_test_split(
        np.arange(len(images)), test_size=test_size, random_state=seed, stratify=digits.target
    )
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def build(indices):
        indices = np.sort(indices)
        return Dataset.from_dict(
            {"image": [images[i] for i in indices], "label": digits.target[indices].tolist()}, features=features
        )

    return DatasetDict(train=build(train_idx), test=build(test_idx))
