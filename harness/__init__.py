"""What the tests and the benchmarks both use, and neither owns: the compose cluster and the
engine's API (cluster), the service on the host under gunicorn (servers), the load generators
(wrk, vegeta), and the inputs: the MNIST test slice, realistic uploads, the benchmark payload
mix, and digits drawn as pen strokes. Nothing here asserts or reports."""
