"""`python -m tf_simclr.benchmark`: runs real steps and counts the step's FLOPs exactly."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _conv(pixels, k, c_in, c_out):
  return 2 * pixels * k * k * c_in * c_out


def resnet18_cifar_forward_conv_flops(size):
  """Forward convolution FLOPs of one view, from the architecture (SimCLR's ResNet-18).

  CIFAR stem (3x3, 64, stride 1, no max-pool); four groups of two basic blocks of widths
  64..512, the first block of every group with a 1x1 projection shortcut (the reference's
  layout, group 1 included), strides 1, 2, 2, 2.
  """
  flops = _conv(size * size, 3, 3, 64)
  c_in = 64
  for group, c_out in enumerate((64, 128, 256, 512)):
    pixels = (size >> group) ** 2
    flops += _conv(pixels, 3, c_in, c_out) + _conv(pixels, 1, c_in, c_out)
    flops += 3 * _conv(pixels, 3, c_out, c_out)
    c_in = c_out
  return flops


def test_benchmark_runs_real_steps_and_counts_the_step_flops(tmp_path):
  batch, size, classes, proj = 8, 16, 10, 128
  out = subprocess.run(
      [sys.executable, "-m", "tf_simclr.benchmark", f"--image_size={size}",
       f"--train_batch_size={batch}", "--steps=2", "--optimizer=adam", "--augment_on_device"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  views = 2 * batch
  # Training = forward + gradient w.r.t. the input + gradient w.r.t. the weights, each as
  # many FLOPs as the forward op. TF skips only the supervised head's input gradient (its
  # input is stop-gradient). Heads: 512 -> 512 -> 512 -> 128 projection, 512 -> 10 linear.
  conv = 3 * views * resnet18_cifar_forward_conv_flops(size)
  projection = 2 * (512 * 512 + 512 * 512 + 512 * proj)
  supervised = 2 * 512 * classes
  dense = views * (3 * projection + 2 * supervised)
  # Four [b, d] x [d, b] logit matmuls (aa, bb, ab, ba), forward and two gradients each.
  contrastive = 3 * 4 * 2 * batch * batch * proj
  assert result["flop_per_step"] == conv + dense + contrastive
  assert abs(result["img_per_s"] * result["step_s"] - batch) < 0.01 * batch
  assert result["step_s_min"] <= result["step_s"] <= result["step_s_max"]
  assert result["views"] == views and result["replicas"] == 1
  assert result["augment_on_device"] is True
  assert result["peak_rss_mb"] > 100
