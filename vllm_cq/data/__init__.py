"""Small text shipped with the package: the default calibration text of `vllm-cq demo`."""
