"""ImageNet-sized JPEGs cut from real photographs: `python -m benchmarks.make_jpeg_folder OUT`.

Writes OUT/train/<photo>/<n>.jpg: `--count` (600) JPEGs of about 500x375 (landscape) or 375x500
(portrait; sides jittered by up to 8%), quality 90, each a random crop (30-100% of the side,
random flip) of one of the photographs that scikit-image (`skimage.data`) and scikit-learn
(`load_sample_images`) ship, resized with Lanczos. The photo's name is the class. Seeded
(`--seed`): the same command writes the same files. For `benchmarks.augment_pipeline
--data_dir=OUT`, whose JPEG figures need real photographs (decoding cost depends on content).
Bad arguments or an existing OUT: one `error: ...` line on stderr, exit 1.
"""

import importlib.util
import os

import numpy as np

import benchmarks

_SIDES = (500, 375)  # ImageNet's most common JPEG size.
_QUALITY = 90


def _photos():
  """{name: uint8 [H, W, 3]}: the colour photographs both libraries ship."""
  from skimage import data
  from sklearn.datasets import load_sample_images

  names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
  photos = {name: getattr(data, name)() for name in names}
  sample = load_sample_images()
  for name, image in zip(sample.filenames, sample.images, strict=True):
    photos[os.path.splitext(os.path.basename(name))[0]] = image
  return {k: np.ascontiguousarray(v[..., :3]) for k, v in photos.items()}


def _cut(photo, rng):
  """One random crop of `photo`, resized to about 500x375 or 375x500: a PIL image."""
  from PIL import Image

  h, w = photo.shape[:2]
  portrait = rng.random() < 0.25
  jitter = rng.uniform(0.92, 1.08, 2)
  out_w, out_h = (int(s * j) for s, j in zip(_SIDES[::-1] if portrait else _SIDES, jitter))
  aspect = out_w / out_h
  scale = rng.uniform(0.3, 1.0)
  crop_w = min(w, int(round(scale * min(w, h * aspect))))
  crop_h = min(h, int(round(crop_w / aspect)))
  y = rng.integers(0, h - crop_h + 1)
  x = rng.integers(0, w - crop_w + 1)
  crop = photo[y : y + crop_h, x : x + crop_w]
  if rng.random() < 0.5:
    crop = crop[:, ::-1]
  return Image.fromarray(np.ascontiguousarray(crop)).resize((out_w, out_h), Image.LANCZOS)


def make_folder(out: str, count: int, seed: int = 0) -> list[str]:
  """Writes the JPEGs under out/train/<photo>/; returns their paths."""
  rng = np.random.default_rng(seed)
  photos = _photos()
  names = sorted(photos)
  paths = []
  for i in range(count):
    name = names[i % len(names)]
    folder = os.path.join(out, "train", name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{i:05d}.jpg")
    _cut(photos[name], rng).save(path, quality=_QUALITY)
    paths.append(path)
  return paths


def main(argv=None):
  parser = benchmarks.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("out", help="folder to create (must not exist)")
  parser.add_argument("--count", type=int, default=600)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.count < 1:
    parser.error(f"--count={args.count} must be >= 1")
  if os.path.exists(args.out):
    parser.error(f"{args.out} exists; give a new folder")
  missing = [m for m in ("skimage", "sklearn", "PIL") if importlib.util.find_spec(m) is None]
  if missing:
    parser.error(f"needs {', '.join(missing)}: pip install scikit-image scikit-learn pillow")
  paths = make_folder(args.out, args.count, args.seed)
  print(f"wrote {len(paths)} JPEGs under {os.path.join(args.out, 'train')}")


if __name__ == "__main__":
  main()
