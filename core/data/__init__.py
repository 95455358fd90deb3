"""A dataset folder, one way: folder -> manifest -> split -> cache -> a run's inputs; synthetic data; the official download."""
