"""Pushers that bring outside services in step with latentbank (the MLflow bridge). They
read the data layer and talk to their service; the workers run them on a schedule, the CLI
by hand, and nothing on a job's path waits for them."""
