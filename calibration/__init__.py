"""Offline calibration of CQ codebooks, installed as `vllm_cq.calibration`.

collect (pre-RoPE K/V + Fisher from a HF model) -> kmeans (weighted k-means++ / Lloyd, batched over
groups) -> calibrate (orchestration, report). The CLI is `vllm-cq calibrate`.
"""

from vllm_cq.calibration.calibrate import (
    CalibrationConfig,
    LayerReport,
    calibrate_formats,
    calibrate_model,
    fit_codebooks,
)

__all__ = ["CalibrationConfig", "LayerReport", "calibrate_formats", "calibrate_model", "fit_codebooks"]
