"""tf_simclr.data_service: a dispatcher and two workers on 127.0.0.1, in this process."""

from __future__ import annotations

import collections
import copy

import numpy as np
import pytest
import tensorflow as tf

from flags import definitions
from tests import runs
from tf_simclr import data_service
from tf_simclr import errors
from tf_simclr.data import pipeline
from tf_simclr.data import sources

SEED = 3
N = 12  # examples
G = 4  # global batch: an epoch is 3 steps
SIZE = 16
AUGMENTATION = dict(
  color_jitter_strength=1.0,
  use_blur=True,
  min_scale=0.08,
  horizontal_flip=True,
  augment_on_device=False,
)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder")
  for i in range(N):
    path = root / "train" / f"c{i % 2}" / f"{i:02d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image = runs.random_image((20 + i, 24, 3), seed=i)  # sizes differ: crops differ
    path.write_bytes(tf.io.encode_png(image).numpy())
  return sources.load_source("image_folder", "train", data_dir=str(root))


@pytest.fixture(scope="module")
def service():
  """grpc://... of a dispatcher with two workers, all on free ports of 127.0.0.1."""
  lib = tf.data.experimental.service
  dispatcher = lib.DispatchServer(lib.DispatcherConfig(port=0))
  address = dispatcher.target.removeprefix("grpc://")
  workers = [lib.WorkerServer(lib.WorkerConfig(dispatcher_address=address)) for _ in range(2)]
  yield dispatcher.target
  for server in [*workers, dispatcher]:
    server._stop()  # noqa: SLF001


def _local_examples(source, steps):
  """{(epoch, id): views} of the local pipeline's first `steps` global batches."""
  ds = pipeline.train_dataset(source, G, G, 1, 0, SEED, SIZE, shuffle_buffer=5, **AUGMENTATION)
  found = {}
  for batch in ds.take(steps):
    epochs = _epochs(batch["id"].numpy(), len(found))
    for e, i, views in zip(epochs, batch["id"].numpy(), batch["views"].numpy()):
      found[(e, int(i))] = views
  return found


def _epochs(ids, before):
  """The local stream's epochs (it does not return them): position // N."""
  return [(before + k) // N for k in range(len(ids))]


def test_step_examples_are_the_local_streams_global_batches(source):
  # Blocks of 5 do not divide the epoch (12) nor a step (4): steps cross blocks and epochs.
  stream = pipeline.global_stream(source, SEED, 0, 5, False).batch(7 * G).take(1)
  local = next(iter(stream))
  steps = tf.data.Dataset.range(7)  # each step computed alone, as on a worker
  got = steps.flat_map(lambda k: data_service.step_examples(k, N, 5, SEED, G)).batch(7 * G)
  got = next(iter(got))
  np.testing.assert_array_equal(got["position"], local["id"])  # ids are positions here
  np.testing.assert_array_equal(got["epoch"], local["epoch"])


def _alternate(datasets_):
  """The elements of `datasets_`, read in turn (as replicas would) until all are exhausted."""
  iterators, found = [iter(ds) for ds in datasets_], []
  while iterators:
    for it in list(iterators):
      try:
        found.append(next(it))
      except StopIteration:
        iterators.remove(it)
  return found


def test_two_workers_make_each_example_of_an_epoch_once_with_the_local_views(source, service):
  # Two input pipelines of one run (batch 1 each: none is left over) share the job: a job per
  # pipeline would give each of them every example.
  pipelines = [
    data_service.train_dataset(
      source,
      G,
      1,
      2,
      p,
      service=service,
      job=data_service.job_name("/runs/x", 0),
      seed=SEED,
      image_size=SIZE,
      num_steps=6,  # two epochs
      shuffle_buffer=5,
      **AUGMENTATION,
    )
    for p in range(2)
  ]
  local = _local_examples(source, 6)
  got = collections.Counter()
  for batch in _alternate(pipelines):
    i, views = int(batch["id"][0]), batch["views"][0].numpy()
    matches = [e for e in (0, 1) if np.array_equal(local[(e, i)], views)]
    assert len(matches) == 1, f"example {i}: views of no local epoch (or of both)"
    got[(matches[0], i)] += 1
  assert got == collections.Counter({(e, i): 1 for e in (0, 1) for i in range(N)})


def test_with_the_crop_on_the_accelerator_the_workers_send_padded_sources(source, service):
  # --augment_on_device off a TPU: the workers decode and draw, the batches carry the source
  # images zero-padded to the batch's largest; the step's crops are the local host crops.
  from tf_simclr import trainer  # pylint: disable=g-import-not-at-top

  on_device = dict(AUGMENTATION, augment_on_device=True)
  ds = data_service.train_dataset(
    source,
    G,
    2,
    1,
    0,
    service=service,
    job=data_service.job_name("/runs/crop", 0),
    seed=SEED,
    image_size=SIZE,
    num_steps=3,  # one epoch
    shuffle_buffer=5,
    crop_on_device=True,
    **on_device,
  )
  local = pipeline.train_dataset(source, G, G, 1, 0, SEED, SIZE, shuffle_buffer=5, **on_device)
  want = {int(i): v for b in local.take(3) for i, v in zip(b["id"].numpy(), b["views"].numpy())}
  rows = {  # each example's height: the folder's images are 20 to 31 rows high
    int(r["id"]): tf.io.decode_png(tf.io.read_file(r["image"])).shape[0] for r in source.records
  }
  seen = []
  for batch in ds:
    ids = batch["id"].numpy()
    assert batch["image"].shape[1] == max(rows[int(i)] for i in ids)
    crops = trainer.crop_views(batch, SIZE)["views"].numpy()
    for i, views in zip(ids, crops):
      assert np.abs(views - want[int(i)]).max() < 2e-6
    seen.extend(ids)
  assert sorted(seen) == list(range(N))


def _flags(**changes):
  flag_values = copy.deepcopy(definitions.FLAGS)  # the defaults, global flags untouched
  flag_values.unparse_flags()
  flag_values(["run.py"])
  values = {**flag_values.flag_values_dict(), "model_dir": "/tmp/unused"}
  values.update(dataset="image_folder", data_service="grpc://127.0.0.1:5050")
  return {**values, **changes}


@pytest.mark.parametrize(
  "changes, words",
  [
    ({"data_service": "127.0.0.1:5050"}, "grpc://HOST:PORT"),
    ({"data_service": "grpc://host:99999"}, "grpc://HOST:PORT"),
    ({"dataset": "cifar10"}, "read in order"),
    ({"train_mode": "finetune"}, "pretraining only"),
    ({"deterministic": True}, "--deterministic"),
    ({"cache_dataset": True}, "--cache_dataset"),
  ],
)
def test_flags_refuse_what_the_service_cannot_do(changes, words):
  definitions.to_config(_flags())  # the base is accepted
  with pytest.raises(ValueError, match=words) as err:
    definitions.to_config(_flags(**changes))
  assert "\n" not in str(err.value)


def test_a_dispatcher_that_does_not_answer_is_one_line_before_model_dir(service, tmp_path):
  import run  # pylint: disable=g-import-not-at-top

  data_service.check_dispatcher(service)  # a live one passes
  (port,) = runs.free_ports(1)
  model_dir = tmp_path / "run"
  values = _flags(data_service=f"grpc://127.0.0.1:{port}", model_dir=str(model_dir))
  with pytest.raises(ValueError, match="no tf.data service dispatcher") as err:
    run.run(definitions.to_config(values), values)
  assert errors.is_input_error(err.value) and "\n" not in str(err.value)
  assert not model_dir.exists()


@pytest.mark.parametrize(
  "argv, words",
  [
    (["worker"], "--dispatcher_address"),
    (["dispatcher", "--port=70000"], "--port"),
    (["dispatcher", "--port=x"], "invalid int"),
    (["router"], "invalid choice"),
  ],
)
def test_server_command_refuses_bad_arguments_in_one_line(argv, words, capsys):
  assert data_service.main(argv) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and words in err and err.count("\n") == 1
