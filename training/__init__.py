"""LeNet-BN on Fashion-MNIST: data, model, distribution strategy and the training driver."""
