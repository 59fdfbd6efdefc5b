"""Which errors are the user's (one `error: ...` line) and which are bugs, and their one line.

No TensorFlow import here: run.py classifies a flag error without loading TensorFlow.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

# sysexits.h's EX_SOFTWARE: an internal error, told apart from bad input (1) by the exit status.
EX_SOFTWARE = 70

# Lines of a TensorFlow error message that say where a graph failed, not why (`File "` is a
# traceback line; a message such as "File system scheme ... not implemented" is kept).
_WHERE = ("Graph execution error", "Detected at node", 'File "')

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = tuple(os.path.join(_ROOT, d) + os.sep for d in ("tf_simclr", "flags")) + (
  os.path.join(_ROOT, "run.py"),
)
# TensorFlow status codes of a computation gone wrong (shapes, dtypes, a kernel's own
# failure): INVALID_ARGUMENT, UNIMPLEMENTED, INTERNAL. The others report the environment: files
# (NOT_FOUND, PERMISSION_DENIED, a full disk's RESOURCE_EXHAUSTED or OUT_OF_RANGE), memory, lost
# workers (UNAVAILABLE, ABORTED, DEADLINE_EXCEEDED, CANCELLED).
_BUG_CODES = frozenset((3, 12, 13))


class InputError(ValueError):
  """Bad user input whose message says what to change: always one line.

  A ValueError raised by a `raise` statement of tf_simclr's own code is one line too
  (`is_input_error`); this class is for input errors raised where that rule would not tell,
  e.g. re-raised from inside a library call.
  """


def first_line(err: BaseException | str, *, whole: bool = False) -> str:
  """The first informative line of `err`'s message; the error's type name if it has none.

  TensorFlow prefixes messages raised inside a tf.function with `{{function_node ...}}` and
  precedes them with the graph's traceback (`Graph execution error:`, `Detected at node ...`,
  `File "..."` lines); both are dropped. With `whole`, every line is kept, joined by single
  spaces: for messages whose later lines matter (TFDS's list of valid configs, manual-download
  instructions naming the files).
  """
  text = err.message if _is_op_error(err) else str(err)
  if whole:
    return " ".join(text.split()) or type(err).__name__
  for line in text.splitlines():
    line = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", line.strip())
    if line and not line.startswith(_WHERE):
      return line
  return type(err).__name__


def _is_op_error(err: BaseException) -> bool:
  tf = sys.modules.get("tensorflow")  # Not loaded: err cannot be one of its errors.
  return tf is not None and isinstance(err, tf.errors.OpError)


def _raised_by_us(err: BaseException) -> bool:
  """Whether the innermost frame of `err`'s traceback is a `raise` statement of our code.

  Not one inside TensorFlow, Keras, NumPy or TFDS (their internal checks), nor a builtin's
  ValueError (e.g. `int('x')`) in our code: its innermost frame is our line, but not a `raise`.
  """
  frames = traceback.extract_tb(err.__traceback__)
  if not frames:
    return False
  where = frames[-1]
  return where.filename.startswith(_OURS) and (where.line or "").lstrip().startswith("raise")


def is_input_error(err: BaseException) -> bool:
  """True if `err` describes the user's input or environment (one line); False for a bug.

  * InputError and our own ValueError classes (DatasetError, ModelDirError,
    CheckpointMismatchError, NonFiniteError, ...), and any ValueError our code raises.
  * OSError: the operating system reports files, disks, permissions, the network.
  * TensorFlow's errors, except those of a computation gone wrong (`_BUG_CODES`).
  Anything else (TypeError, KeyError, a ValueError from inside TensorFlow or Keras) is a bug.
  """
  if isinstance(err, OSError):
    return True
  if _is_op_error(err):
    return err.error_code not in _BUG_CODES
  if isinstance(err, ValueError):
    ours = isinstance(err, InputError) or type(err).__module__.startswith("tf_simclr.")
    return ours or _raised_by_us(err)
  return False
