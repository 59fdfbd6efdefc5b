"""tf_simclr: SimCLR and SimCLRv2 in TensorFlow 2 / Keras 3 under tf.distribute."""
