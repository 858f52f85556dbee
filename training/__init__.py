"""LeNet-BN on Fashion-MNIST: data, model, distribution strategy and drivers.

The drivers train it (`training.train`), search its learning rate
(`training.tune`), export it (`training.export`) and answer the source
chapter's exercises (`training.exercises`).
"""

import os

# TensorFlow's C++ INFO lines (oneDNN notices, CUDA probing on machines without
# a GPU) drown the progress bars of the command-line tools; warnings and
# errors still show. Set TF_CPP_MIN_LOG_LEVEL yourself to see everything.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
