"""nc-study: Ray Tune + MLflow studies of Neural Collapse (see README.md)."""
