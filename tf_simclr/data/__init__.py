"""The data: where examples come from, which of them have labels, and the input pipelines.

Modules, and who calls them:
  sources         `Source` (a split's encoded records, in a fixed order), `DatasetError` and
                  `load_source`, which opens a tensorflow-datasets, built-in or image-folder
                  split; TFDS splits are read here. Called by `plan.make_plan`, tests, benchmarks.
  image_folder    image folders (`data_dir/<split>/<class>/<images>`): listing, labels, what is
                  skipped. Called by `sources.load_source`.
  label_subsets   few labels: a class-balanced fraction or a file of ids (`label_subset`),
                  restricting a Source to them (`subset_source`), recording them in model_dir.
                  Called by `plan`, `run.py` and `knn`.
  pipeline        the deterministic, distributable input pipelines (`train_dataset`,
                  `eval_dataset`) and their determinism contract. Called by `train`, `evaluate`
                  and `knn`.
  deadleaves10, deadleaves10_color, shapes10
                  the built-in datasets: NumPy renderers of 32x32 images, registered as TFDS
                  builders when `sources` is imported (names in `config.BUILT_IN_DATASETS`).
  offline_builder the TFDS builder the built-ins share (nothing to download).
"""
