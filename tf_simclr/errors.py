"""One-line messages from errors, TensorFlow's included, for `error: ...` lines."""

from __future__ import annotations

import re

import tensorflow as tf

# Lines of a TensorFlow error message that say where a graph failed, not why (`File "` is a
# traceback line; a message such as "File system scheme ... not implemented" is kept).
_WHERE = ("Graph execution error", "Detected at node", 'File "')


def first_line(err: BaseException | str, *, whole: bool = False) -> str:
  """The first informative line of `err`'s message; the error's type name if it has none.

  TensorFlow prefixes messages raised inside a tf.function with `{{function_node ...}}` and
  precedes them with the graph's traceback (`Graph execution error:`, `Detected at node ...`,
  `File "..."` lines); both are dropped. With `whole`, every line is kept, joined by single
  spaces: for messages whose later lines matter (TFDS's list of valid configs, manual-download
  instructions naming the files).
  """
  text = err.message if isinstance(err, tf.errors.OpError) else str(err)
  if whole:
    return " ".join(text.split()) or type(err).__name__
  for line in text.splitlines():
    line = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", line.strip())
    if line and not line.startswith(_WHERE):
      return line
  return type(err).__name__
