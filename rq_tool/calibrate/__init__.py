"""Calibration: data, recorder (hooks with one owner), profile format and the calibrate() stage.

Exports load lazily (``rq_tool._lazy``); ``rq_tool.calibrate`` itself is the API function
(``rq_tool.api``), this package is reached by import statements.
"""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "CalibrationData": ".data", "load_tags": ".data", "load_texts": ".data", "pack": ".data",
    "LayerProfile": ".profile", "Profile": ".profile", "config_fingerprint": ".profile",
    "ExpertRecorder": ".recorder", "calibrate": ".run", "profile_model": ".run",
})
__all__ = ["CalibrationData", "ExpertRecorder", "LayerProfile", "Profile", "calibrate", "config_fingerprint",
           "load_tags", "load_texts", "pack", "profile_model"]
