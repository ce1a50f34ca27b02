"""The sparse autoencoder: parameters, encode/decode, losses, the sparse step, sparsify I/O, importance scores."""
