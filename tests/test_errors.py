"""errors.first_line: the one home of the first-line extraction used by the `error:` lines."""

import tensorflow as tf

from tf_simclr import errors


def test_first_line_drops_tensorflow_graph_context():
  @tf.function
  def fail(x):
    tf.debugging.assert_equal(x, 2, message="the shapes differ")
    return x

  try:
    fail(tf.constant(1))
  except tf.errors.InvalidArgumentError as err:
    line = errors.first_line(err)
  assert line.startswith("assertion failed: [the shapes differ]"), line
  assert "function_node" not in line and "Graph execution" not in line


def test_first_line_keeps_the_first_informative_line_or_names_the_type():
  assert errors.first_line(ValueError("\n  first  \nsecond")) == "first"
  assert errors.first_line(OSError()) == "OSError"
  # A TensorFlow op error raised eagerly: its `.message`, without TensorFlow's op suffix lines.
  err = tf.errors.NotFoundError(None, None, "no such file\ndetails")
  assert errors.first_line(err) == "no such file"


def test_whole_joins_every_line_for_messages_whose_later_lines_matter():
  # TFDS lists the valid configs, and manual-download instructions name the archives, on
  # later lines: data/sources.py keeps them all (whole=True), on one line.
  instructions = "Download the archive\n   ILSVRC2012_img_train.tar  \n\ninto manual_dir."
  joined = errors.first_line(instructions, whole=True)
  assert joined == "Download the archive ILSVRC2012_img_train.tar into manual_dir."
  assert errors.first_line(instructions) == "Download the archive"
  assert errors.first_line(ValueError(""), whole=True) == "ValueError"
