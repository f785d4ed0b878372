"""Tests for the real-image data loaders, splits, centering and hygiene checks."""

import hashlib
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from biasdiff import images as bi
from biasdiff.images import celeba
from biasdiff.images import celeba_tfds
from biasdiff.images import data as data_lib
from biasdiff.images import digits

# Tiny CelebA stand-in: 24 files, 3 blocks of 4 and a test set of 5.
NUM_FILES = 24
LAYOUT = bi.BlockLayout(block_size=4, num_blocks=3, heldout_size=5)
FILE_NAMES = [f"{i:06d}.jpg" for i in range(1, NUM_FILES + 1)]
EXPECTED_ROWS = list(range(12)) + list(range(19, 24))


def _random_face(seed: int, height: int = 218, width: int = 178) -> np.ndarray:
  """Smooth random RGB uint8 image, so that JPEG keeps it close to its values."""
  generator = np.random.default_rng(seed)
  coarse = generator.random((7, 6, 3)).astype(np.float32)
  image = jax.image.resize(jnp.asarray(coarse), (height, width, 3), method="linear")
  return np.asarray(np.clip(np.asarray(image) * 255.0, 0, 255), np.uint8)


def _write_jpegs(folder: pathlib.Path, names=FILE_NAMES) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  for i, name in enumerate(names):
    Image.fromarray(_random_face(i)).save(folder / name, quality=95)
  return folder


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> pathlib.Path:
  return _write_jpegs(tmp_path_factory.mktemp("celeba") / "img_align_celeba")


def _expected_image(path: pathlib.Path) -> np.ndarray:
  with Image.open(path) as image:
    rgb = np.asarray(image.convert("RGB"))
  return bi.preprocess_celeba_image(rgb)


def _small_data(num_images: int = 12, seed: int = 0) -> data_lib.ImageData:
  generator = np.random.default_rng(seed)
  images = generator.random((num_images, 4, 4, 1)).astype(np.float32)
  return bi.ImageData(images=images, ids=tuple(str(i) for i in range(num_images)), metadata={"kind": "test"})


# ImageData and its files.


def test_image_data_hash_is_sha256_of_float32_bytes():
  data = _small_data()
  want = hashlib.sha256(np.ascontiguousarray(data.images, "<f4").tobytes()).hexdigest()
  assert data.sha256 == want
  changed = data.images.copy()
  changed[3, 1, 2, 0] += 1e-3
  assert bi.array_sha256(changed) != data.sha256


def test_image_data_is_read_only():
  data = _small_data()
  with pytest.raises(ValueError):
    data.images[0, 0, 0, 0] = 0.5


@pytest.mark.parametrize(
    "images, ids, error",
    [
        (np.zeros((2, 4, 4, 1), np.float64), ("0", "1"), TypeError),
        (np.zeros((2, 4, 4), np.float32), ("0", "1"), ValueError),
        (np.full((2, 4, 4, 1), 1.5, np.float32), ("0", "1"), ValueError),
        (np.full((2, 4, 4, 1), np.nan, np.float32), ("0", "1"), ValueError),
        (np.zeros((2, 4, 4, 1), np.float32), ("0",), ValueError),
        (np.zeros((2, 4, 4, 1), np.float32), (0, 1), TypeError),
    ],
)
def test_image_data_rejects_invalid_input(images, ids, error):
  with pytest.raises(error):
    bi.ImageData(images=images, ids=ids, metadata={})


def test_image_data_save_load_round_trip(tmp_path):
  data = _small_data()
  bi.save_image_data(data, tmp_path / "set")
  loaded = bi.load_image_data(tmp_path / "set", expected_sha256=data.sha256)
  np.testing.assert_array_equal(loaded.images, data.images)
  assert loaded.ids == data.ids
  assert loaded.metadata == {"kind": "test"}
  assert loaded.sha256 == data.sha256
  # The array is a plain .npy that loads without pickle, and no temporary
  # file is left behind.
  np.testing.assert_array_equal(np.load(tmp_path / "set" / "images.npy", allow_pickle=False), data.images)
  assert sorted(os.listdir(tmp_path / "set")) == ["data.json", "images.npy"]


def test_load_image_data_rejects_modified_array(tmp_path):
  data = _small_data()
  bi.save_image_data(data, tmp_path)
  modified = data.images.copy()
  modified[0, 0, 0, 0] = 0.0 if modified[0, 0, 0, 0] else 0.5
  np.save(tmp_path / "images.npy", modified)
  with pytest.raises(ValueError, match="SHA-256") as error:
    bi.load_image_data(tmp_path)
  assert str(tmp_path) in str(error.value)


def test_load_image_data_rejects_unexpected_hash(tmp_path):
  bi.save_image_data(_small_data(), tmp_path)
  with pytest.raises(ValueError, match="expected 00ff"):
    bi.load_image_data(tmp_path, expected_sha256="00ff")


def test_load_image_data_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="images.npy"):
    bi.load_image_data(tmp_path / "absent")


# Splits and centering.


def test_block_layout_rows():
  layout = bi.BlockLayout(block_size=3, num_blocks=2, heldout_size=4)
  np.testing.assert_array_equal(layout.source_rows(20), [0, 1, 2, 3, 4, 5, 16, 17, 18, 19])
  blocks, heldout = layout.stored_splits_indices()
  np.testing.assert_array_equal(blocks[1], [3, 4, 5])
  np.testing.assert_array_equal(heldout, [6, 7, 8, 9])


def test_block_layout_too_large_names_numbers():
  layout = bi.BlockLayout(block_size=8, num_blocks=2, heldout_size=5)
  with pytest.raises(ValueError, match=r"2 blocks of 8 plus 5 .* need 21 rows, but the source has 20"):
    layout.source_rows(20)


def test_celeba_default_layout_rows():
  rows = bi.BlockLayout().source_rows(celeba.CELEBA_NUM_FILES)
  assert rows.size == 17408
  assert rows[15 * 1024 - 1] == 15359
  # The test set is rows [200551, 202599), files 200552.jpg ... 202599.jpg.
  assert rows[15 * 1024] == 200551
  assert rows[-1] == 202598


def test_make_splits_means():
  data = _small_data()
  splits = bi.make_splits(data, [[0, 1, 2], [5, 6, 7]], [10, 11])
  assert splits.block_means[0] == pytest.approx(float(np.mean(data.images[[0, 1, 2]], dtype=np.float64)), abs=1e-12)
  assert splits.block_means[1] == pytest.approx(float(np.mean(data.images[[5, 6, 7]], dtype=np.float64)), abs=1e-12)
  assert splits.global_mean == pytest.approx(float(np.mean(data.images[[0, 1, 2, 5, 6, 7]], dtype=np.float64)), abs=1e-12)
  assert splits.data_sha256 == data.sha256


def test_splits_reject_overlap_naming_blocks():
  data = _small_data()
  with pytest.raises(ValueError, match=r"blocks 1 and heldout share 1 rows, first \[6\]"):
    bi.make_splits(data, [[0, 1, 2], [5, 6, 7]], [6, 11])


def test_splits_reject_unequal_blocks():
  with pytest.raises(ValueError, match="equal size"):
    bi.make_splits(_small_data(), [[0, 1, 2], [5, 6]], [10])


def test_splits_reject_rows_outside_data():
  with pytest.raises(ValueError, match="12 images"):
    bi.make_splits(_small_data(), [[0, 1, 12]], [10])


def test_assert_disjoint_catches_overlap():
  splits = bi.make_splits(_small_data(), [[0, 1], [2, 3]], [4])
  # Build an overlapping record behind the constructor's back.
  object.__setattr__(splits, "heldout", np.array([3]))
  with pytest.raises(ValueError, match="blocks 1 and heldout"):
    bi.assert_disjoint(splits)


def test_center_block_uses_own_mean():
  data = _small_data()
  splits = bi.make_splits(data, [[0, 1, 2], [5, 6, 7]], [10, 11])
  centered, shift = bi.center_block(data, splits, 1)
  assert shift == splits.block_means[1]
  assert centered.dtype == np.float32
  assert abs(float(np.mean(centered, dtype=np.float64))) < 1e-7
  np.testing.assert_allclose(centered, data.images[[5, 6, 7]] - np.float32(shift), atol=0)


def test_center_block_global_option():
  data = _small_data()
  splits = bi.make_splits(data, [[0, 1, 2], [5, 6, 7]], [10, 11])
  shifts = [bi.center_block(data, splits, b, centering="global")[1] for b in range(2)]
  assert shifts == [splits.global_mean, splits.global_mean]
  assert splits.block_means[0] != splits.block_means[1]
  with pytest.raises(ValueError, match="centering"):
    bi.centering_shift(splits, 0, centering="test")
  with pytest.raises(ValueError, match=r"\[0, 2\)"):
    bi.centering_shift(splits, 2)


def test_block_images_heldout():
  data = _small_data()
  splits = bi.make_splits(data, [[0, 1, 2]], [10, 11])
  np.testing.assert_array_equal(bi.block_images(data, splits, "heldout"), data.images[[10, 11]])
  with pytest.raises(ValueError, match="unknown block"):
    bi.block_images(data, splits, 3)


def test_splits_save_load_round_trip(tmp_path):
  data = _small_data()
  splits = bi.make_splits(data, [[0, 1, 2], [5, 6, 7]], [10, 11], metadata={"seed": 3})
  bi.save_prepared(data, splits, tmp_path)
  loaded_data, loaded = bi.load_prepared(tmp_path, expected_sha256=data.sha256)
  assert loaded.data_sha256 == data.sha256 == loaded_data.sha256
  assert [b.tolist() for b in loaded.train_blocks] == [[0, 1, 2], [5, 6, 7]]
  assert loaded.heldout.tolist() == [10, 11]
  assert loaded.block_means == splits.block_means
  assert loaded.global_mean == splits.global_mean
  assert loaded.metadata == {"seed": 3}
  record = json.loads((tmp_path / "splits.json").read_text())
  assert record["data_sha256"] == data.sha256


def test_splits_reject_other_data(tmp_path):
  data = _small_data(seed=0)
  splits = bi.make_splits(data, [[0, 1, 2]], [10, 11])
  bi.save_splits(splits, tmp_path)
  with pytest.raises(ValueError, match="SHA-256"):
    bi.load_splits(tmp_path, _small_data(seed=1))


def test_splits_reject_edited_means(tmp_path):
  data = _small_data()
  bi.save_splits(bi.make_splits(data, [[0, 1, 2]], [10, 11]), tmp_path)
  record = json.loads((tmp_path / "splits.json").read_text())
  record["block_means"][0] += 1e-3
  (tmp_path / "splits.json").write_text(json.dumps(record))
  with pytest.raises(ValueError, match="centering constant of block 0"):
    bi.load_splits(tmp_path, data)


# Digits.


def test_digits_default_blocks():
  data, splits = bi.load_digits_data()
  assert data.images.shape == (1797, 8, 8, 1)
  assert data.images.dtype == np.float32
  assert data.images.min() == 0.0
  assert data.images.max() == 1.0
  # Scaled by 1/16 from integers 0 ... 16.
  np.testing.assert_array_equal(data.images * 16, np.round(data.images * 16))
  assert data.ids[:3] == ("0", "1", "2")

  assert splits.num_blocks == 2
  assert splits.block_size == 640
  assert splits.heldout.size == 517
  permutation = np.random.default_rng(0).permutation(1797)
  np.testing.assert_array_equal(splits.train_blocks[0], permutation[:640])
  np.testing.assert_array_equal(splits.train_blocks[1], permutation[640:1280])
  np.testing.assert_array_equal(splits.heldout, permutation[1280:])
  assert splits.data_sha256 == data.sha256
  bi.check_matches(splits, data)


def test_digits_match_sklearn():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  raw = load_digits().images
  data, _ = bi.load_digits_data()
  np.testing.assert_array_equal(data.images[..., 0], (raw / 16).astype(np.float32))


def test_digits_seed_and_sizes():
  data_a, splits_a = bi.load_digits_data(block_size=128, num_blocks=4, heldout_size=300, seed=1)
  data_b, splits_b = bi.load_digits_data(block_size=128, num_blocks=4, heldout_size=300, seed=1)
  _, splits_c = bi.load_digits_data(block_size=128, num_blocks=4, heldout_size=300, seed=2)
  assert data_a.sha256 == data_b.sha256
  for block_a, block_b in zip(splits_a.train_blocks, splits_b.train_blocks):
    np.testing.assert_array_equal(block_a, block_b)
  assert not np.array_equal(splits_a.train_blocks[0], splits_c.train_blocks[0])
  assert [b.size for b in splits_a.train_blocks] == [128] * 4
  assert splits_a.heldout.size == 300
  union = np.concatenate([*splits_a.train_blocks, splits_a.heldout])
  assert np.unique(union).size == 4 * 128 + 300


def test_digits_too_many_rows_names_numbers():
  with pytest.raises(ValueError, match=r"3 blocks of 600 plus 1 held-out images need 1801 digits, but there are 1797"):
    bi.load_digits_data(block_size=600, num_blocks=3, heldout_size=1)
  with pytest.raises(ValueError, match="leave none held out"):
    bi.load_digits_data(block_size=599, num_blocks=3)


def test_digits_upsampled_matches_jax_linear_resize():
  data, splits = bi.load_digits_data(size=16)
  native, _ = bi.load_digits_data(size=8)
  assert data.images.shape == (1797, 16, 16, 1)
  assert data.metadata["upsampling"] == digits.UPSAMPLING
  assert native.metadata["upsampling"] is None
  want = jax.image.resize(jnp.asarray(native.images[:100]), (100, 16, 16, 1), method="linear")
  np.testing.assert_allclose(data.images[:100], np.asarray(want), atol=1e-6)
  assert splits.data_sha256 == data.sha256 != native.sha256


def test_upsample2x_known_values():
  image = np.array([[0.0, 1.0]], np.float32).reshape(1, 1, 2, 1)
  out = digits.upsample2x_bilinear(image)
  np.testing.assert_allclose(out[0, 0, :, 0], [0.0, 0.25, 0.75, 1.0])
  np.testing.assert_allclose(out[0, 1, :, 0], [0.0, 0.25, 0.75, 1.0])


# CelebA preprocessing.


def test_celeba_resized_shape_and_crop():
  assert celeba.resized_shape(218, 178) == (39, 32)
  assert celeba.center_crop_offsets(39, 32) == (4, 0)
  assert celeba.resized_shape(100, 300) == (32, 96)


def _reference_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Antialiased bilinear resize written out: a triangle filter widened by the scale."""

  def weights(size_in: int, size_out: int) -> np.ndarray:
    scale = size_in / size_out
    support = max(scale, 1.0)
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
      center = (i + 0.5) * scale
      for j in range(size_in):
        matrix[i, j] = max(0.0, 1.0 - abs(j + 0.5 - center) / support)
      matrix[i] /= matrix[i].sum()
    return matrix

  rows = weights(image.shape[0], height)
  columns = weights(image.shape[1], width)
  return np.einsum("ih,hwc,jw->ijc", rows, image.astype(np.float64), columns)


@pytest.mark.parametrize("backend", ["pil", "jax"])
def test_preprocess_matches_written_out_reference(backend):
  rgb = (np.random.default_rng(3).random((218, 178, 3)) * 255).astype(np.uint8)
  resized = _reference_resize(rgb / 255.0, 39, 32)[4:36]
  want = 0.299 * resized[..., 0] + 0.587 * resized[..., 1] + 0.114 * resized[..., 2]
  got = bi.preprocess_celeba_image(rgb, resize_backend=backend)
  assert got.shape == (32, 32)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_preprocess_backends_agree():
  rgb = _random_face(7)
  pil = bi.preprocess_celeba_image(rgb, resize_backend="pil")
  jax_result = bi.preprocess_celeba_image(rgb, resize_backend="jax")
  assert np.max(np.abs(pil - jax_result)) < 1e-5


def test_preprocess_grayscale_weights():
  rgb = np.zeros((218, 178, 3), np.uint8)
  rgb[...] = (200, 100, 50)
  got = bi.preprocess_celeba_image(rgb)
  np.testing.assert_allclose(got, (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255, atol=1e-6)


def test_preprocess_rejects_bad_input():
  with pytest.raises(ValueError, match="uint8"):
    bi.preprocess_celeba_image(np.zeros((218, 178, 3), np.float32))
  with pytest.raises(ValueError, match="resize_backend"):
    bi.preprocess_celeba_image(np.zeros((218, 178, 3), np.uint8), resize_backend="cv2")


# CelebA from a folder of JPEGs.


def test_folder_loader_rows_and_values(jpeg_folder):
  data, splits = bi.load_celeba_folder(jpeg_folder, layout=LAYOUT)
  assert data.images.shape == (17, 32, 32, 1)
  assert data.ids == tuple(FILE_NAMES[r] for r in EXPECTED_ROWS)
  assert data.metadata["source_rows"] == EXPECTED_ROWS
  assert data.metadata["file_list_sha256"] == hashlib.sha256("\n".join(FILE_NAMES).encode()).hexdigest()
  assert data.metadata["preprocessing"]["resize"]["library"] == "Pillow"
  for position in (0, 11, 12, 16):
    want = _expected_image(jpeg_folder / data.ids[position])
    np.testing.assert_array_equal(data.images[position, ..., 0], want)

  assert [b.tolist() for b in splits.train_blocks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
  assert splits.heldout.tolist() == [12, 13, 14, 15, 16]
  assert splits.data_sha256 == data.sha256
  bi.assert_disjoint(splits)
  assert splits.metadata["heldout_files"] == ["000020.jpg", "000024.jpg"]


def test_folder_loader_accepts_parent_folder(jpeg_folder):
  from_parent, _ = bi.load_celeba_folder(jpeg_folder.parent, layout=LAYOUT)
  direct, _ = bi.load_celeba_folder(jpeg_folder, layout=LAYOUT)
  assert from_parent.sha256 == direct.sha256


def test_folder_loader_decodes_only_needed_rows(tmp_path):
  folder = _write_jpegs(tmp_path / "jpegs")
  # Row 15 (000016.jpg) lies between the last block and the test rows.
  (folder / "000016.jpg").write_bytes(b"not a jpeg")
  data, _ = bi.load_celeba_folder(folder, layout=LAYOUT)
  assert "000016.jpg" not in data.ids


def test_folder_loader_names_corrupt_file(tmp_path):
  folder = _write_jpegs(tmp_path / "jpegs")
  (folder / "000003.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match="cannot decode JPEG 000003.jpg"):
    bi.load_celeba_folder(folder, layout=LAYOUT)


def test_folder_loader_names_truncated_file(tmp_path):
  folder = _write_jpegs(tmp_path / "jpegs")
  payload = (folder / "000005.jpg").read_bytes()
  (folder / "000005.jpg").write_bytes(payload[: len(payload) // 2])
  with pytest.raises(ValueError, match="000005.jpg"):
    bi.load_celeba_folder(folder, layout=LAYOUT)


def test_folder_loader_rejects_wrong_size(tmp_path):
  folder = _write_jpegs(tmp_path / "jpegs")
  Image.fromarray(_random_face(0, height=100, width=80)).save(folder / "000002.jpg")
  with pytest.raises(ValueError, match=r"000002.jpg is 80 wide x 100 high, expected 178 x 218"):
    bi.load_celeba_folder(folder, layout=LAYOUT)
  data, _ = bi.load_celeba_folder(folder, layout=LAYOUT, source_shape=None)
  assert data.images.shape == (17, 32, 32, 1)


def test_folder_loader_missing_or_empty_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    bi.load_celeba_folder(tmp_path / "absent")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no .jpg files"):
    bi.load_celeba_folder(tmp_path / "empty")


def _empty_jpegs(folder: pathlib.Path, count: int) -> pathlib.Path:
  folder.mkdir(parents=True)
  for i in range(1, count + 1):
    (folder / f"{i:06d}.jpg").touch()
  return folder


def test_check_folder_counts_names_only(tmp_path):
  # Empty files cannot be decoded, so the check passes only if it opens none.
  folder = _empty_jpegs(tmp_path / "img_align_celeba", LAYOUT.num_rows)
  (folder / "list_eval_partition.txt").touch()
  celeba.check_folder(folder, LAYOUT)
  celeba.check_folder(tmp_path, LAYOUT)


def test_check_folder_rejects_too_few_files(tmp_path):
  folder = _empty_jpegs(tmp_path / "jpegs", LAYOUT.num_rows - 1)
  with pytest.raises(ValueError, match=r"contains 16 JPEG files, but 3 blocks of 4 plus 5 "
                     r"held-out images need 17"):
    celeba.check_folder(folder, LAYOUT)


def test_check_folder_missing_or_empty_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="CelebA folder .*absent not found"):
    celeba.check_folder(tmp_path / "absent", LAYOUT)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no .jpg files"):
    celeba.check_folder(tmp_path / "empty", LAYOUT)


def test_tfds_check_source_finds_prepared_dataset(tmp_path):
  with pytest.raises(FileNotFoundError, match="no prepared celeb_a dataset"):
    celeba_tfds.check_source(LAYOUT, data_dir=tmp_path)
  version = tmp_path / "celeb_a" / "2.1.0"
  version.mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="no prepared celeb_a dataset"):
    celeba_tfds.check_source(LAYOUT, data_dir=tmp_path)
  (version / "dataset_info.json").write_text("{}")
  celeba_tfds.check_source(LAYOUT, data_dir=tmp_path)


def test_tfds_check_source_rejects_large_layout(tmp_path):
  layout = bi.BlockLayout(block_size=200_000, num_blocks=2, heldout_size=5)
  with pytest.raises(ValueError, match="the source has 202599"):
    celeba_tfds.check_source(layout, data_dir=tmp_path)


def test_folder_loader_layout_larger_than_data(jpeg_folder):
  with pytest.raises(ValueError, match=r"need 25 rows, but the source has 24"):
    bi.load_celeba_folder(jpeg_folder, layout=bi.BlockLayout(block_size=5, num_blocks=4, heldout_size=5))


def test_folder_cache_reused_when_options_match(tmp_path, jpeg_folder, monkeypatch):
  cache = tmp_path / "cache"
  first, first_splits = bi.load_celeba_folder(jpeg_folder, layout=LAYOUT, cache_dir=cache)
  assert len(os.listdir(cache)) == 1

  def fail(*args, **kwargs):
    raise AssertionError("the cache should have been used")

  monkeypatch.setattr(celeba, "decode_jpeg", fail)
  second, second_splits = bi.load_celeba_folder(jpeg_folder, layout=LAYOUT, cache_dir=cache)
  np.testing.assert_array_equal(second.images, first.images)
  assert second.sha256 == first.sha256
  assert second.ids == first.ids
  assert second_splits.block_means == first_splits.block_means


def test_folder_cache_rebuilt_for_other_options_or_files(tmp_path):
  folder = _write_jpegs(tmp_path / "jpegs")
  cache = tmp_path / "cache"
  bi.load_celeba_folder(folder, layout=LAYOUT, cache_dir=cache)
  bi.load_celeba_folder(folder, layout=bi.BlockLayout(block_size=2, num_blocks=3, heldout_size=5), cache_dir=cache)
  assert len(os.listdir(cache)) == 2
  # One more file changes the file-list hash, and the test rows move.
  Image.fromarray(_random_face(99)).save(folder / "000025.jpg")
  data, _ = bi.load_celeba_folder(folder, layout=LAYOUT, cache_dir=cache)
  assert len(os.listdir(cache)) == 3
  assert data.ids[-1] == "000025.jpg"


def test_folder_cache_with_wrong_hash_raises(tmp_path, jpeg_folder):
  cache = tmp_path / "cache"
  data, _ = bi.load_celeba_folder(jpeg_folder, layout=LAYOUT, cache_dir=cache)
  (entry,) = list(cache.iterdir())
  modified = data.images.copy()
  modified[0, 0, 0, 0] = 1.0 - modified[0, 0, 0, 0]
  np.save(entry / "images.npy", modified)
  with pytest.raises(ValueError, match="Delete") as error:
    bi.load_celeba_folder(jpeg_folder, layout=LAYOUT, cache_dir=cache)
  assert str(entry) in str(error.value)


# CelebA through tensorflow-datasets.


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory, jpeg_folder) -> pathlib.Path:
  """Prepare the JPEG folder as an ArrayRecord TFDS dataset keyed by file name."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import registered  # pylint: disable=g-import-not-at-top

  data_dir = tmp_path_factory.mktemp("tfds")
  # The builder is not registered, so data_source reads it from its files,
  # as it would read a copy of celeb_a prepared elsewhere.
  with registered.skip_registration():

    class TinyFaces(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(218, 178, 3), encoding_format="jpeg")}
            ),
        )

      def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples(FILE_NAMES[:19]),
            "test": self._generate_examples(FILE_NAMES[19:]),
        }

      def _generate_examples(self, names):
        for name in names:
          yield name, {"image": os.fspath(jpeg_folder / name)}

    TinyFaces(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


TINY_PARTITION = {"train": FILE_NAMES[:19], "test": FILE_NAMES[19:]}


def test_tfds_record_order_is_key_hash_order(tfds_dir, jpeg_folder):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  source = tfds.data_source("tiny_faces", split="train", data_dir=tfds_dir, decoders={"image": tfds.decode.SkipDecoding()})
  order = celeba_tfds.tfds_record_order(FILE_NAMES[:19], "train")
  assert order != FILE_NAMES[:19]
  for index in (0, 7, 18):
    assert source[index]["image"] == (jpeg_folder / order[index]).read_bytes()


def test_tfds_loader_equals_folder_loader(tfds_dir, jpeg_folder):
  from_tfds, tfds_splits = bi.load_celeba_tfds(
      layout=LAYOUT, name="tiny_faces", data_dir=tfds_dir, partition=TINY_PARTITION
  )
  from_folder, folder_splits = bi.load_celeba_folder(jpeg_folder, layout=LAYOUT)
  np.testing.assert_array_equal(from_tfds.images, from_folder.images)
  assert from_tfds.sha256 == from_folder.sha256
  assert from_tfds.ids == from_folder.ids
  assert from_tfds.metadata["file_list_sha256"] == from_folder.metadata["file_list_sha256"]
  assert from_tfds.metadata["splits"] == ["test", "train"]
  assert tfds_splits.block_means == folder_splits.block_means


def test_tfds_loader_with_tfds_decoding(tfds_dir, jpeg_folder):
  decoded, _ = bi.load_celeba_tfds(
      layout=LAYOUT, name="tiny_faces", data_dir=tfds_dir, partition=TINY_PARTITION, decoder="tfds"
  )
  from_folder, _ = bi.load_celeba_folder(jpeg_folder, layout=LAYOUT)
  # Pillow or OpenCV decode the same bytes; allow one grey level of difference.
  assert np.max(np.abs(decoded.images - from_folder.images)) <= 1.0 / 255


def test_tfds_loader_rejects_partition_of_other_size(tfds_dir):
  partition = {"train": FILE_NAMES[:18], "test": FILE_NAMES[19:]}
  with pytest.raises(ValueError, match="contains 19 records but the partition lists 18"):
    bi.load_celeba_tfds(layout=LAYOUT, name="tiny_faces", data_dir=tfds_dir, partition=partition)


def test_tfds_loader_under_mock_data():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # mock_data gives every split the same 10 random 218 x 178 examples.
  partition = {"train": FILE_NAMES[:10], "test": FILE_NAMES[10:20]}
  layout = bi.BlockLayout(block_size=3, num_blocks=2, heldout_size=4)
  with tfds.testing.mock_data(num_examples=10):
    data, splits = bi.load_celeba_tfds(layout=layout, partition=partition, decoder="tfds")
    train = tfds.data_source("celeb_a", split="train")
    test = tfds.data_source("celeb_a", split="test")
    train_order = celeba_tfds.tfds_record_order(partition["train"], "train")
    test_order = celeba_tfds.tfds_record_order(partition["test"], "test")
    want_first = bi.preprocess_celeba_image(train[train_order.index("000001.jpg")]["image"])
    want_last = bi.preprocess_celeba_image(test[test_order.index("000020.jpg")]["image"])
  assert data.images.shape == (10, 32, 32, 1)
  assert data.ids == ("000001.jpg", "000002.jpg", "000003.jpg", "000004.jpg", "000005.jpg", "000006.jpg",
                      "000017.jpg", "000018.jpg", "000019.jpg", "000020.jpg")
  np.testing.assert_array_equal(data.images[0, ..., 0], want_first)
  np.testing.assert_array_equal(data.images[-1, ..., 0], want_last)
  assert data.metadata["tfds_name"] == "celeb_a"
  assert splits.heldout.tolist() == [6, 7, 8, 9]


def test_celeba_partition_sizes():
  partition = celeba_tfds.celeba_partition()
  assert [len(partition[s]) for s in ("train", "validation", "test")] == [162770, 19867, 19962]
  assert partition["test"][-2048] == "200552.jpg"
  assert partition["train"][15 * 1024 - 1] == "015360.jpg"


# Synthetic proxy.


def test_proxy_deterministic_and_row_wise():
  layout_a = bi.BlockLayout(block_size=16, num_blocks=2, heldout_size=8)
  layout_b = bi.BlockLayout(block_size=8, num_blocks=2, heldout_size=4)
  data_a, splits_a = bi.make_proxy_data(layout_a, seed=5, source_size=1000)
  data_a2, _ = bi.make_proxy_data(layout_a, seed=5, source_size=1000)
  data_b, _ = bi.make_proxy_data(layout_b, seed=5, source_size=1000)
  data_c, _ = bi.make_proxy_data(layout_a, seed=6, source_size=1000)
  assert data_a.sha256 == data_a2.sha256
  assert data_c.sha256 != data_a.sha256
  # A row's image depends only on (seed, row): the first 16 and the last 4
  # rows are shared by both layouts.
  np.testing.assert_array_equal(data_b.images[:16], data_a.images[:16])
  np.testing.assert_array_equal(data_b.images[-4:], data_a.images[-4:])
  assert data_a.ids[:2] == ("0", "1")
  assert data_a.ids[-1] == "999"
  assert splits_a.heldout.tolist() == list(range(32, 40))
  bi.check_matches(splits_a, data_a)


def test_proxy_images_have_spatial_structure():
  data, _ = bi.make_proxy_data(bi.BlockLayout(block_size=32, num_blocks=2, heldout_size=16), seed=0, source_size=100)
  images = data.images[..., 0]
  assert images.shape == (80, 32, 32)
  assert images.min() > 0.0
  assert images.max() < 1.0
  # Neighbouring pixels are strongly correlated (coarse blobs) but not equal
  # (fine blobs and texture), and images differ from each other.
  left = images[:, :, :-1].ravel() - images.mean()
  right = images[:, :, 1:].ravel() - images.mean()
  neighbour_correlation = float(np.dot(left, right) / np.sqrt(np.dot(left, left) * np.dot(right, right)))
  assert 0.8 < neighbour_correlation < 0.999
  assert float(np.std(images.mean(axis=(1, 2)))) > 0.02


# Hygiene.


def test_pearson_matrix_matches_corrcoef():
  generator = np.random.default_rng(0)
  a = generator.random((5, 4, 4, 1)).astype(np.float32)
  b = generator.random((7, 4, 4, 1)).astype(np.float32)
  want = np.corrcoef(a.reshape(5, -1), b.reshape(7, -1))[:5, 5:]
  np.testing.assert_allclose(bi.pearson_matrix(a, b), want, atol=1e-5)


def test_pearson_affine_invariant():
  generator = np.random.default_rng(1)
  x = generator.random((3, 16)).astype(np.float32)
  y = generator.random((4, 16)).astype(np.float32)
  np.testing.assert_allclose(bi.pearson_matrix(2.5 * x + 0.3, y), bi.pearson_matrix(x, y), atol=1e-5)
  np.testing.assert_allclose(np.diag(bi.pearson_matrix(x, x)), 1.0, atol=1e-6)


def test_pearson_constant_image_gives_zero():
  a = np.full((1, 16), 0.4, np.float32)
  b = np.random.default_rng(2).random((3, 16)).astype(np.float32)
  np.testing.assert_array_equal(bi.pearson_matrix(a, b), np.zeros((1, 3)))


def test_correlation_report_finds_duplicates():
  generator = np.random.default_rng(3)
  a = generator.random((40, 8, 8, 1)).astype(np.float32)
  b = generator.random((30, 8, 8, 1)).astype(np.float32)
  b[5] = 0.5 * a[3] + 0.2  # a contrast-reduced copy
  b[17] = a[21] + 0.01 * generator.standard_normal((8, 8, 1)).astype(np.float32)
  report = bi.correlation_report(a, b, tile_size=7)
  assert [(i, j) for i, j, _ in report.duplicates] == [(3, 5), (21, 17)]
  assert report.duplicates[0][2] == pytest.approx(1.0, abs=1e-5)
  assert report.duplicates[1][2] >= 0.995
  assert len(report.top_pairs) == 10
  assert report.top_pairs[:2] == report.duplicates
  values = [r for _, _, r in report.top_pairs]
  assert values == sorted(values, reverse=True)
  assert report.max_r == values[0]

  # Tiling does not change the result, and the top pairs are the largest entries.
  untiled = bi.correlation_report(a, b, tile_size=1000)
  assert untiled == report
  matrix = bi.pearson_matrix(a, b)
  np.testing.assert_allclose(values, np.sort(matrix.ravel())[::-1][:10], atol=1e-6)

  record = report.to_json(ids_a=[f"a{i}" for i in range(40)], ids_b=[f"b{j}" for j in range(30)])
  assert record["num_duplicates"] == 2
  assert record["duplicates"][0]["id_a"] == "a3"
  assert record["duplicates"][0]["id_b"] == "b5"
  json.dumps(record)


def test_correlation_report_on_digit_blocks():
  data, splits = bi.load_digits_data(block_size=200, num_blocks=2, heldout_size=200)
  report = bi.correlation_report(bi.block_images(data, splits, 0), bi.block_images(data, splits, "heldout"))
  assert len(report.top_pairs) == 10
  assert 0.5 < report.max_r <= 1.0 + 1e-6
