"""The study's plots, drawn only from its data file (benchmarks/study.py writes it) and, for the
colour histograms, from the product's own dataset and augmentation. matplotlib is imported here
and nowhere else.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

EXAMPLES = 5000  # deadleaves10's training split: steps -> epochs
DPI = 90  # keeps each PNG well under 200 KB


def _save(fig, out: str, name: str) -> str:
  path = os.path.join(out, f"{name}.png")
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  plt.close(fig)
  return path


def _batch(record: dict) -> int:
  """The run's global batch, from its command (the quick start's 128 unless overridden)."""
  sizes = [a.split("=")[1] for a in record["command"].split() if a.startswith("--train_batch_size")]
  return int(sizes[-1]) if sizes else 128


def _curve(record: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(epochs, kNN top-1 in %, seconds) of the run's monitor, one point per step."""
  points = {step: (v, t) for step, v, t in record.get("knn_curve", [])}
  steps = np.array(sorted(points), dtype=float)
  values = np.array([points[s][0] for s in sorted(points)]) * 100
  seconds = np.array([points[s][1] for s in sorted(points)])
  return steps * _batch(record) / EXAMPLES, values, seconds


def _ok(records: dict, name: str) -> dict | None:
  r = records.get(name)
  return r if r is not None and not r.get("failed") else None


def learning_curve(records: dict, out: str) -> str | None:
  """The quick start's kNN monitor against epochs, with the untrained encoder as a line."""
  run, untrained = _ok(records, "quickstart"), _ok(records, "untrained")
  if run is None:
    return None
  fig, ax = plt.subplots(figsize=(5.5, 3.4))
  epochs, knn, _ = _curve(run)
  ax.plot(epochs, knn, "o-", label="SimCLR pretraining (kNN on h)")
  if untrained is not None:
    ax.axhline(untrained["knn_top1"] * 100, color="grey", ls="--", label="untrained encoder")
  if "h" in run.get("linear_eval", {}) and "top1" in run["linear_eval"]["h"]:
    ax.plot(
      epochs[-1],
      run["linear_eval"]["h"]["top1"] * 100,
      "s",
      color="C3",
      label="linear evaluation at the end",
    )
  ax.set(xlabel="epoch", ylabel="top-1 on deadleaves10 test (%)", ylim=(0, 100))
  ax.set_title("The quick start learns (ResNet-10 w0.25, 2-core CPU)", fontsize=10)
  ax.legend(fontsize=8, loc="lower right")
  ax.grid(alpha=0.3)
  return _save(fig, out, "learning_curve")


COMPOSITION = (
  ("composition_crop", "crop"),
  ("composition_colour", "colour"),
  ("composition_crop_colour", "crop +\ncolour"),
  ("composition_crop_colour_blur", "crop +\ncolour + blur"),
  ("composition_crop_colour_e16", "crop + colour\n0.5, 16 ep."),
)
JITTER = (
  ("composition_crop", 0.0),
  ("composition_jitter_0.25", 0.25),
  ("composition_jitter_0.5", 0.5),
  ("composition_crop_colour", 1.0),
)


def _last(points: list) -> float:
  return points[-1][1] if points else float("nan")


def composition(records: dict, out: str) -> str | None:
  """Figure 5's composition and the jitter-strength sweep: linear evaluation / kNN on h beside the
  final contrastive accuracy, on deadleaves10_color."""
  done = [(label, _ok(records, name)) for name, label in COMPOSITION]
  done = [(label, r) for label, r in done if r is not None]
  if not done:
    return None
  fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6))
  x = np.arange(len(done))
  le = [r["linear_eval"].get("h", {}).get("top1", np.nan) * 100 for _, r in done]
  acc = [_last(r["contrast_acc"]) * 100 for _, r in done]
  left.bar(x - 0.2, le, 0.4, label="linear evaluation on h")
  left.bar(x + 0.2, acc, 0.4, label="contrastive accuracy (training)")
  left.set_xticks(x, [label for label, _ in done], fontsize=7)
  left.set(ylabel="%", ylim=(0, 100), title="Augmentations (deadleaves10_color)")
  left.legend(fontsize=7, loc="upper left")
  sweep = [(s, _ok(records, name)) for name, s in JITTER]
  sweep = [(s, r) for s, r in sweep if r is not None]
  strengths = [s for s, _ in sweep]
  right.plot(strengths, [r["knn_top1"] * 100 for _, r in sweep], "o-", label="kNN on h")
  right.plot(
    strengths,
    [_last(r["contrast_acc"]) * 100 for _, r in sweep],
    "s--",
    label="contrastive accuracy",
  )
  right.set(
    xlabel="colour-jitter strength (with crops)",
    ylabel="%",
    ylim=(0, 100),
    title="Colour distortion strength",
  )
  right.legend(fontsize=7)
  for ax in (left, right):
    ax.grid(alpha=0.3, axis="y")
  return _save(fig, out, "composition")


HEADS = (
  ("none", "no head"),
  ("linear", "linear"),
  ("mlp2", "2-layer MLP"),
  ("mlp3", "3-layer MLP"),
)


def head(records: dict, out: str) -> str | None:
  """Figure 8: each head's h and z read by one frozen-feature probe, and the product's linear
  evaluation of h, at temperatures 0.1 and 0.5; then h's linear evaluation with and without
  the 3-layer head at 8 and 16 epochs."""
  temperatures = [t for t in (0.1, 0.5) if any(_ok(records, f"head_{h}_t{t}") for h, _ in HEADS)]
  length = {label: [_ok(records, n) for n in names] for label, names in HEAD_LENGTH.items()}
  with_length = all(r is not None for rs in length.values() for r in rs)
  panels = len(temperatures) + with_length
  if not panels:
    return None
  fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.6), squeeze=False)
  for ax, t in zip(axes[0], temperatures):
    _head_bars(ax, records, t)
  if with_length:
    ax = axes[0][-1]
    for label, rs in length.items():
      ax.plot([8, 16], [r["linear_eval"]["h"]["top1"] * 100 for r in rs], "o-", label=label)
    ax.set(
      xlabel="epochs (temperature 0.1)",
      ylabel="linear evaluation of h (%)",
      title="training length",
      xticks=[8, 16],
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  return _save(fig, out, "head")


# Linear evaluation of h at 8 and 16 epochs: (run at 8, run at 16) per head.
HEAD_LENGTH = {
  "no head": ("head_none_t0.1", "head_none_e16"),
  "3-layer MLP": ("head_mlp3_t0.1", "quickstart"),
}


def _head_bars(ax, records: dict, t: float) -> None:
  runs = [(label, _ok(records, f"head_{h}_t{t}")) for h, label in HEADS]
  runs = [(label, r) for label, r in runs if r is not None]
  x = np.arange(len(runs))
  h_probe = [r["probes"]["h"]["probe"] * 100 for _, r in runs]
  z_probe = [r["probes"]["z"]["probe"] * 100 if label != "no head" else np.nan for label, r in runs]
  le = [r["linear_eval"].get("h", {}).get("top1", np.nan) * 100 for _, r in runs]
  ax.bar(x - 0.27, le, 0.27, label="h: linear evaluation (run.py)")
  ax.bar(x, h_probe, 0.27, label="h: probe")
  ax.bar(x + 0.27, z_probe, 0.27, label="z = head output: probe")
  ax.set_xticks(x, [label for label, _ in runs], fontsize=8)
  low = np.nanmin(h_probe + z_probe + le)
  ax.set(ylabel="top-1 (%)", ylim=(max(0, low - 10), 100), title=f"temperature {t}, 8 epochs")
  ax.grid(alpha=0.3, axis="y")
  if t == 0.1:
    ax.legend(fontsize=7, loc="upper right")


TEMPERATURES = (0.05, 0.1, 0.2, 0.5, 1.0)


def temperature(records: dict, out: str) -> str | None:
  """Table 5: kNN and probe on h against temperature, normalised and not; failed runs marked."""
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  drawn = False
  for norm, style in (("norm", "o-"), ("nonorm", "s--")):
    for key, colour in (("knn", "C0"), ("probe", "C1")):
      xs, ys = [], []
      for t in TEMPERATURES:
        r = records.get(f"temperature_{t}_{norm}")
        if r is None:
          continue
        if r.get("failed"):
          ax.plot(t, 2, "x", color="C3", ms=9)
          continue
        xs.append(t)
        ys.append(r["probes"]["h"][key] * 100)
      if xs:
        drawn = True
        label = f"{'L2-normalised' if norm == 'norm' else 'unnormalised'}, {key} on h"
        ax.plot(xs, ys, style, color=colour, label=label)
  if not drawn:
    plt.close(fig)
    return None
  ax.set(
    xscale="log",
    xlabel="temperature",
    ylabel="top-1 (%)",
    ylim=(0, 100),
    title="Temperature and normalisation (x: run diverged)",
  )
  ax.set_xticks(TEMPERATURES, [str(t) for t in TEMPERATURES])
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  return _save(fig, out, "temperature")


def batch(records: dict, out: str) -> str | None:
  """Figure 9: the kNN monitor against epochs and against wall time, one line per batch size."""
  runs = [(b, _ok(records, f"batch_{b}")) for b in (32, 64, 128, 256)]
  runs = [(b, r) for b, r in runs if r is not None]
  if not runs:
    return None
  fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6), sharey=True)
  for b, r in runs:
    epochs, knn, seconds = _curve(r)
    left.plot(epochs, knn, "o-", ms=3, label=f"batch {b}")
    right.plot(seconds, knn, "o-", ms=3, label=f"batch {b}")
  left.set(xlabel="epoch", ylabel="kNN top-1 on h (%)", ylim=(0, 100))
  right.set(xlabel="seconds of training (this CPU)")
  left.legend(fontsize=8)
  for ax in (left, right):
    ax.grid(alpha=0.3)
  return _save(fig, out, "batch")


def colour_histograms(out: str) -> str:
  """Figure 6: intensity histograms of two crops of each of two deadleaves10_color images,
  without and with colour distortion (the product's augmentation, fixed seeds)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from tf_simclr import augment  # pylint: disable=g-import-not-at-top
  from tf_simclr.data import deadleaves10_color  # pylint: disable=g-import-not-at-top

  images = deadleaves10_color.generate("test")[0][:2]
  fig, axes = plt.subplots(2, 4, figsize=(10, 4.2))
  for row, strength in enumerate((0.0, 1.0)):
    for col in range(4):
      image, view = images[col // 2], col % 2
      seed = tf.constant([7, 100 * col + view], tf.int64)
      crop = augment.simclr_augment(
        image, seed, 32, 32, color_jitter_strength=strength, use_blur=False
      ).numpy()
      ax = axes[row][col]
      for channel, colour in enumerate(("red", "green", "blue")):
        ax.hist(crop[..., channel].ravel(), bins=24, range=(0, 1), color=colour, alpha=0.45)
      ax.set_yticks([])
      ax.set_title(
        f"image {col // 2 + 1}, crop {view + 1}" + (" (colour distortion)" if strength else ""),
        fontsize=8,
      )
  fig.suptitle(
    "Two crops of one image share a colour histogram unless colour is distorted", fontsize=10
  )
  return _save(fig, out, "colour_histograms")


PLOTS = {
  "curve": learning_curve,
  "composition": composition,
  "head": head,
  "temperature": temperature,
  "batch": batch,
}


def draw(records: dict, ablations: list[str], out: str) -> list[str]:
  """Draws the plots of `ablations` that have data; returns the files written."""
  paths = [PLOTS[a](records, out) for a in ablations]
  if "composition" in ablations:
    paths.append(colour_histograms(out))
  return [p for p in paths if p]
