"""Real-image data: digits, CelebA 32 x 32 grayscale and a synthetic proxy.

Every loader returns a pair `(data, splits)`:

- `data` is an `ImageData`: float32 images [N, H, W, 1] in [0, 1], their
  source ids, the SHA-256 of the image bytes and a record of how they were
  made.
- `splits` is a `Splits`: K disjoint training blocks of n rows and a held-out
  block, with the data hash and the centering constants.

The loaders:

- `load_digits_data`: scikit-learn's 1,797 handwritten digits, the offline
  default.
- `load_celeba_folder`: CelebA from the aligned JPEGs (img_align_celeba).
- `load_celeba_tfds`: CelebA prepared for tensorflow-datasets (ArrayRecord).
- `make_proxy_data`: synthetic 32 x 32 images split like CelebA.

A model trained on block b sees `center_block(data, splits, b)`, and every
other input to it is shifted by the same `centering_shift(splits, b)`.
"""

from biasdiff.images.celeba import load_celeba_folder
from biasdiff.images.celeba import preprocess_celeba_image
from biasdiff.images.celeba_tfds import load_celeba_tfds
from biasdiff.images.data import ImageData
from biasdiff.images.data import array_sha256
from biasdiff.images.data import load_image_data
from biasdiff.images.data import save_image_data
from biasdiff.images.digits import load_digits_data
from biasdiff.images.hygiene import CorrelationReport
from biasdiff.images.hygiene import correlation_report
from biasdiff.images.hygiene import pearson_matrix
from biasdiff.images.proxy import make_proxy_data
from biasdiff.images.splits import BlockLayout
from biasdiff.images.splits import Splits
from biasdiff.images.splits import assert_disjoint
from biasdiff.images.splits import block_images
from biasdiff.images.splits import center_block
from biasdiff.images.splits import centering_shift
from biasdiff.images.splits import check_matches
from biasdiff.images.splits import load_prepared
from biasdiff.images.splits import load_splits
from biasdiff.images.splits import make_splits
from biasdiff.images.splits import save_prepared
from biasdiff.images.splits import save_splits
