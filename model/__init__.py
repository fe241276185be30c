"""Training, evaluation and export of the MNIST CNN (`make train`)."""
